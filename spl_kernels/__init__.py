"""Triton kernels. Import ``spl_kernels.fused_logprobs`` only where ``HAS_TRITON`` is True.

This package imports only torch and triton, and triton only in its kernel modules, so the rest of
the project (and machines without triton) can import ``spl_kernels`` to ask whether it is usable.
"""

from importlib.util import find_spec

# find_spec looks the package up without importing it: importing triton here would fix its
# interpreter setting (TRITON_INTERPRET) before tests had a chance to choose it.
HAS_TRITON = find_spec("triton") is not None
