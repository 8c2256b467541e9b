"""SPL: Soft Preference Learning, a from-scratch PyTorch reference implementation."""
