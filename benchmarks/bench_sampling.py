"""Generation throughput: ``spl.sampling.generate`` against transformers' ``generate`` on CPU.

Same weights in both (our state dict is HF's minus the ``model.`` prefix): a Mistral of dim 256,
4 layers, 8 query heads, 2 KV heads, head_dim 32, SwiGLU 768, vocabulary 32000, fp32. Batch 16
prompts of 16 random tokens, 128 new tokens each, ancestral sampling at temperature 1 with no
filter (HF: top_k=None, else it defaults to 50) and no end-of-sequence id, so every row runs
the full budget. HF uses its default SDPA attention and dynamic cache. 2 threads; one warm-up run
each, then the fastest of ``--repeats`` alternating runs (development and CI machines are shared;
the fastest run is the least disturbed). Before timing, greedy outputs of both are checked equal:
the comparison is between two implementations of one model. transformers is test-only: this
script needs it, the library does not.

    python benchmarks/bench_sampling.py [--repeats 5] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from spl.config import ModelConfig
from spl.model import Transformer
from spl.sampling import generate

BATCH, PROMPT_LEN, NEW_TOKENS = 16, 16, 128
CFG = ModelConfig(dim=256, n_layers=4, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2,
                  vocab_size=32000, rope_theta=1e4, sliding_window=None, max_seq_len=2048)


def hf_twin(model: Transformer):
    """transformers' MistralForCausalLM holding ``model``'s weights."""
    import transformers

    hf_cfg = transformers.MistralConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.hidden_dim,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
        head_dim=CFG.head_dim, rope_theta=CFG.rope_theta, rms_norm_eps=CFG.norm_eps,  # HF default 1e-6
        sliding_window=None, max_position_embeddings=CFG.max_seq_len, attn_implementation="sdpa")
    hf = transformers.MistralForCausalLM(hf_cfg).eval()
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    # No end-of-sequence id: every row generates exactly NEW_TOKENS, as ours does with eos_id=None.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append", default=None, help="markdown file to append the table to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    hf = hf_twin(model)
    prompts = torch.randint(3, CFG.vocab_size, (BATCH, PROMPT_LEN))  # (B, T)
    prompt_lists = prompts.tolist()

    def ours(greedy: bool = False) -> list[list[int]]:
        out = generate(model, prompt_lists, max_new_tokens=NEW_TOKENS, temperature=0.0 if greedy else 1.0,
                       seed=0)
        assert all(len(t) == NEW_TOKENS for t in out.tokens)
        return out.tokens

    def theirs(greedy: bool = False) -> list[list[int]]:
        with torch.inference_mode():
            # Sampling otherwise defaults to top-k 50; top_k=None leaves no logits warper at all.
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=not greedy,
                              top_k=None, max_new_tokens=NEW_TOKENS)  # (B, T + NEW_TOKENS)
        assert out.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)
        return out[:, PROMPT_LEN:].tolist()

    # Same model: greedy continuations agree token for token (fp32, random weights: no near-ties
    # in the first 16 steps in practice; a mismatch later would be a legitimate rounding split).
    assert [t[:16] for t in ours(greedy=True)] == [t[:16] for t in theirs(greedy=True)], "models differ"

    times: dict[str, list[float]] = {"spl.sampling.generate": [], "transformers generate": []}
    runs = {"spl.sampling.generate": ours, "transformers generate": theirs}
    for fn in runs.values():
        fn()  # warm-up: allocator, threads, lazy inits
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = BATCH * NEW_TOKENS
    ours_s, hf_s = (min(times[k]) for k in runs)
    import transformers

    lines = [
        f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; batch {BATCH}, prompt {PROMPT_LEN}, "
        f"{NEW_TOKENS} new tokens, T = 1 sampling; best of {args.repeats} (load average "
        f"{os.getloadavg()[0]:.1f}).",
        "",
        "| generator | seconds | new tokens/s | speed-up |",
        "|---|---:|---:|---:|",
        f"| transformers `generate` | {hf_s:.3f} | {tokens / hf_s:.0f} | 1.00x |",
        f"| `spl.sampling.generate` | {ours_s:.3f} | {tokens / ours_s:.0f} | {hf_s / ours_s:.2f}x |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
