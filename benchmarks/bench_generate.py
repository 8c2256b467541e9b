"""Generation throughput on one device: ``spl.sampling.generate`` against transformers' ``generate``.

    python benchmarks/bench_generate.py                         # CUDA: Mistral-7B shape, bf16
    python benchmarks/bench_generate.py --compile               # also torch.compile our decode step
    python benchmarks/bench_generate.py --device cpu --preset tiny --dtype fp32 --new-tokens 32

Same random weights in both models (ours are made on the device in ``--dtype`` and copied into
transformers' ``MistralForCausalLM``). ``--batch`` prompts of ``--prompt-len`` random tokens,
``--new-tokens`` new tokens each, ancestral sampling at temperature 1 with no filter and no
end-of-sequence id, so every row runs the whole budget. transformers runs with its dynamic cache
and with its static cache, both with ``disable_compile=True`` (recent transformers compile the
forward by themselves when the cache is static; that is a different comparison). Each generator:
one warm-up, then the median of ``--repeats`` runs, timed with a device synchronisation. Before
timing, both models' logits for the prompts are compared (relative error of the full (B, T, V)
logits): a broken weight copy shows up as an error near 1, bf16 rounding as ~1e-2. (Greedy
tokens are no check here: random weights give near-uniform logits, whose argmax bf16 rounding
flips.)

``--compile`` wraps our model in ``torch.compile(dynamic=True)`` (the KV cache grows by one slot a
step, so a static-shape compile would recompile every step) and reports its warm-up (compile)
time separately. transformers is a benchmark-only dependency: the library never imports it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spl.config import ModelConfig  # noqa: E402
from spl.sampling import generate  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_twin(model, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """transformers' MistralForCausalLM holding ``model``'s weights (copied, same device and dtype)."""
    import transformers

    hf_cfg = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,  # HF default 1e-6
        sliding_window=cfg.sliding_window, max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa", tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in ``dtype`` directly: no fp32 copy of a 7B model
    try:
        with torch.device(device):
            hf = transformers.MistralForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    hf.generation_config.pad_token_id = 0
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="mistral-7b-v0.2", help="model shape (spl.config.PRESETS)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    parser.add_argument("--out", default=None, help="write the table to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_generate.py: no CUDA device; pass --device cpu --preset tiny --dtype fp32")
    dtype = DTYPES[args.dtype]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu_step import build_model  # random weights made on the device, no fp32 copy

    cfg = ModelConfig.preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, device, dtype).eval()
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), device=device)  # (B, T)
    prompt_lists = prompts.tolist()
    tokens = args.batch * args.new_tokens

    def ours(m=model) -> list[list[int]]:
        return generate(m, prompt_lists, max_new_tokens=args.new_tokens, seed=0).tokens

    runs = {"spl.sampling.generate (eager)": ours}
    agree = None
    if not args.no_hf:
        hf = hf_twin(model, cfg, device, dtype)

        def theirs(cache: str | None) -> list[list[int]]:
            kwargs = {"cache_implementation": cache} if cache else {}
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                  top_k=None, max_new_tokens=args.new_tokens, disable_compile=True, **kwargs)
            return out[:, args.prompt_len:].tolist()  # (B, new)

        with torch.inference_mode():
            a = model(prompts).float()  # (B, T, V)
            b = hf(prompts).logits.float()  # (B, T, V)
            agree = ((a - b).norm() / b.norm()).item()
            del a, b
        runs["transformers generate, dynamic cache"] = lambda: theirs(None)
        runs["transformers generate, static cache"] = lambda: theirs("static")

    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()  # warm-up
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    compile_note = ""
    if args.compile:
        compiled = torch.compile(model, dynamic=True)
        sync(device)
        t0 = time.perf_counter()
        ours(compiled)  # compiles prefill and decode shapes
        ours(compiled)  # any recompilation a second call still needs
        sync(device)
        compile_note = f"torch.compile warm-up (2 calls, compile included): {time.perf_counter() - t0:.1f} s"
        name = "spl.sampling.generate (torch.compile, dynamic)"
        times[name] = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            ours(compiled)
            sync(device)
            times[name].append(time.perf_counter() - t0)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    base = statistics.median(times["spl.sampling.generate (eager)"])
    lines = [f"Device: {card}; torch {torch.__version__}; preset {args.preset} "
             f"({args.dtype}, random weights); "
             f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, T = 1 sampling; "
             f"median of {args.repeats}."]
    if agree is not None:
        import transformers
        lines.append(f"transformers {transformers.__version__}; prompt logits, ours vs transformers: "
                     f"relative error {agree:.1e}.")
    if compile_note:
        lines.append(compile_note)
    lines += ["", "| generator | seconds | new tokens/s | vs ours (eager) |", "|---|---:|---:|---:|"]
    for name, ts in times.items():
        s = statistics.median(ts)
        lines.append(f"| {name} | {s:.3f} | {tokens / s:,.0f} | {base / s:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
