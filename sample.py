"""Sample from a model: token-level temperature/top-k/top-p/min-p, or a global (sequence-level)
temperature that targets pi(y)^(1/T) over whole responses (paper eqs. 7-10).

    python sample.py --global-temp 2                       # the demo checkpoint (runs/demo)
    python sample.py --checkpoint runs/hh-spl --prompt "How do I bake bread?" --num-samples 4
    python sample.py --checkpoint /models/Mistral-7B-Instruct-v0.2 \\
        --adapter runs/x/checkpoints/step_0005000/adapter --prompts-file prompts.jsonl \\
        --temperature 0.7 --top-p 0.9 --output samples.jsonl
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

from spl.chat_templates import CHOICES as CHAT_TEMPLATES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo",
                   help="a train.py run directory or one of its step_* checkpoints, or an HF-layout / "
                        "original-layout model directory (default: runs/demo)")
    p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to apply on top")
    p.add_argument("--tokenizer", help="SentencePiece file (default: the checkpoint's tokenizer.model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="prompts, one per line (.txt) or JSONL records with 'prompt' "
                                          "(text) or 'messages' (a conversation)")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="auto",
                   help="how prompts are posed: auto (as the checkpoint was trained: its run config, "
                        "tokenizer_config.json or control tokens), mistral-v1, mistral-v3, zephyr, none "
                        "(plain text)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="token budget per completion (default 64)")
    p.add_argument("--global-temp", type=float, help="sequence-level temperature T: sample from pi(y)^(1/T)")
    p.add_argument("--method", choices=["auto", "resample", "smc"], default="auto",
                   help="global-temperature sampler: importance resampling, sequential Monte Carlo, or "
                        "auto (resample for T >= 1, smc for T < 1)")
    p.add_argument("--num-candidates", type=int,
                   help="candidates / particles per prompt for --global-temp (default max(16, 4 x samples))")
    p.add_argument("--temperature", type=float, default=1.0, help="token-level temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="keep the smallest set of tokens with probability >= p")
    p.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p x the top one's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--output", help="write one JSON line per completion to this file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)
    if args.global_temp is not None and (args.temperature != 1.0 or args.top_k or args.top_p or args.min_p):
        p.error("--global-temp replaces token-level --temperature/--top-k/--top-p/--min-p; "
                "use one or the other")
    if args.global_temp is not None and args.global_temp <= 0:
        p.error("--global-temp must be positive")
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--num-samples, --max-new-tokens and --batch-size must be at least 1")
    return args


def read_prompts(args) -> list:
    """Prompts as strings, or as message lists (from JSONL 'messages')."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"sample.py: --prompts-file not found: {path}")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"sample.py: {path}, line {n}: invalid JSON ({e.msg})") from None
            value = rec.get("messages", rec.get("prompt")) if isinstance(rec, dict) else None
            if not isinstance(value, str | list):
                raise SystemExit(f"sample.py: {path}, line {n}: needs a 'prompt' string or 'messages' list")
            prompts.append(rec["messages"] if "messages" in rec else rec["prompt"])
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from spl.chat_templates import ChatTemplateError, set_chat_template
    from spl.checkpoint import CheckpointError, load_for_inference
    from spl.sampling import generate, sample_global_temperature

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        loaded = load_for_inference(args.checkpoint, adapter=args.adapter, tokenizer=args.tokenizer,
                                    device=device, dtype=dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 1
    model, tok = loaded.model, loaded.tokenizer
    try:
        print(set_chat_template(tok, args.chat_template, checkpoint=loaded.source, base=loaded.base,
                                adapter=args.adapter), file=sys.stderr)
    except ChatTemplateError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 1
    if loaded.has_adapter:
        from spl.lora import merge
        merge(model)  # fold the adapters in once: decoding then costs what the base model costs
    prompts = read_prompts(args)
    if not prompts:
        prompts = default_prompts(loaded.source)
    ids = []
    for n, p in enumerate(prompts):
        try:  # a text prompt is one user message: plain text under the "none" template
            ids.append(tok.encode_prompt(p if isinstance(p, list) else [{"role": "user", "content": p}]))
        except ValueError as e:
            print(f"sample.py: prompt {n}: {e}", file=sys.stderr)
            return 1
    method = "token" if args.global_temp is None else args.method
    if method == "auto":  # the sampler's own rule, recorded so outputs say what actually ran
        method = "resample" if args.global_temp >= 1 else "smc"
    kw = dict(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, eos_id=tok.eos_id)
    streaming = sys.stdout.isatty() and args.global_temp is None and len(ids) * args.num_samples == 1
    out_file = open(args.output, "w") if args.output else None  # noqa: SIM115 (closed below)
    shown = 0
    try:
        for start in range(0, len(ids), args.batch_size):
            batch = ids[start:start + args.batch_size]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if args.global_temp is None:
                    stream = None
                    if streaming:
                        stream, shown = _streamer(tok, prompts[0]), 1
                    res = generate(model, batch, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, min_p=args.min_p, seed=args.seed + start,
                                   stream=stream, **kw)
                    ess = None
                else:
                    res = sample_global_temperature(model, batch, args.global_temp, method=args.method,
                                                    num_candidates=args.num_candidates,
                                                    seed=args.seed + start, **kw)
                    ess = res.ess.tolist()
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            for i, toks in enumerate(res.tokens):
                p_idx = int(res.prompt_index[i])
                text = tok.decode([t for t in toks if t != tok.eos_id])
                temp = args.global_temp if args.global_temp is not None else args.temperature
                record = {"prompt": prompts[start + p_idx], "completion": text, "num_tokens": len(toks),
                          "logp": float(res.logps[i]), "method": method, "temperature": temp,
                          "ess": ess[p_idx] if ess is not None else None}
                if out_file:
                    out_file.write(json.dumps(record) + "\n")
                if not shown:
                    header = (f"[prompt {start + p_idx}, sample {i % args.num_samples}] "
                              f"logp={record['logp']:.2f}")
                    if ess is not None:
                        header += f" ess={ess[p_idx]:.1f}"
                    print(f"{header}\n{_show(prompts[start + p_idx])}{text}\n")
    finally:
        if out_file:
            out_file.close()
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _show(prompt) -> str:
    return prompt if isinstance(prompt, str) else "".join(f"{m['role']}: {m['content']}\n" for m in prompt)


def _streamer(tok, prompt):
    """Print text as tokens arrive: decode the whole completion each time and print what is new
    (SentencePiece joins pieces with context, so per-token decoding would mangle spaces)."""
    state = {"ids": [], "text": ""}
    print(_show(prompt), end="", flush=True)

    def on_token(t: int) -> None:
        if t == tok.eos_id:
            print(flush=True)
            return
        state["ids"].append(t)
        text = tok.decode(state["ids"])
        print(text[len(state["text"]):], end="", flush=True)
        state["text"] = text
    return on_token


def default_prompts(source: Path) -> list[str]:
    """The demo's questions when sampling the demo checkpoint; else ask for a prompt."""
    if (source / "trainer_state.json").is_file() and (source.parent.parent / "demo_results.json").is_file():
        from spl.demo import QUESTIONS, format_prompt
        return [format_prompt(q, opts) for q, opts, _ in QUESTIONS]
    raise SystemExit("sample.py: give --prompt or --prompts-file")


if __name__ == "__main__":
    sys.exit(main())
