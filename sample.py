"""Sample from a model: token-level temperature/top-k/top-p/min-p, or a global (sequence-level)
temperature that targets pi(y)^(1/T) over whole responses (paper eqs. 7-10).

    python sample.py --global-temp 2                       # the demo checkpoint (runs/demo)
    python sample.py --checkpoint runs/hh-spl --prompt "How do I bake bread?" --num-samples 4
    python sample.py --checkpoint /models/Mistral-7B-Instruct-v0.2 \\
        --adapter runs/x/checkpoints/step_0005000/adapter --prompts-file prompts.jsonl \\
        --temperature 0.7 --top-p 0.9 --stop "\\n\\nUser:" --output samples.jsonl

Every option is checked before any weights are loaded: a bad one exits with code 2 and one line.
"""

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from spl.chat_templates import CHOICES as CHAT_TEMPLATES


def fail(message: str):
    """A bad input: one line on stderr, exit code 2 (as argparse does)."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        fail(message)  # one line: argparse would print the whole usage block first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo",
                   help="a train.py run directory or one of its step_* checkpoints, or an HF-layout / "
                        "original-layout model directory (default: runs/demo)")
    p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to apply on top")
    p.add_argument("--tokenizer", help="tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE); "
                   "default: the checkpoint's own")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="prompts, one per line (.txt) or JSONL records with 'prompt' "
                                          "(text) or 'messages' (a conversation)")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="auto",
                   help="how prompts are posed: auto (as the checkpoint was trained: its run config, "
                        "tokenizer_config.json or control tokens), mistral-v1, mistral-v3, zephyr, "
                        "chatml, none (plain text)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="token budget per completion (default 64)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a completion where TEXT first appears (repeatable); its text is cut there")
    p.add_argument("--global-temp", type=float, help="sequence-level temperature T: sample from pi(y)^(1/T)")
    p.add_argument("--method", choices=["auto", "resample", "smc"], default="auto",
                   help="global-temperature sampler: importance resampling, sequential Monte Carlo, or auto "
                        "(spl.global_temperature.choose_method)")
    p.add_argument("--num-candidates", type=int,
                   help="candidates / particles per prompt for --global-temp (default max(16, 4 x samples))")
    p.add_argument("--moves", type=int, help="smc: Metropolis-Hastings rejuvenation moves after each "
                                             "resampling step and after the final draw (default: auto's)")
    p.add_argument("--temperature", type=float, default=1.0, help="token-level temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="keep the smallest set of tokens with probability >= p")
    p.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p x the top one's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64,
                   help="rows decoded at once: prompts x samples, or prompts x candidates under "
                        "--global-temp (default 64)")
    p.add_argument("--output", help="write one JSON line per completion to this file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)
    token_level = {"--temperature": args.temperature != 1.0, "--top-k": args.top_k is not None,
                   "--top-p": args.top_p is not None, "--min-p": args.min_p is not None}
    if args.global_temp is not None and any(token_level.values()):
        p.error(f"--global-temp replaces token-level {', '.join(k for k, v in token_level.items() if v)}; "
                "use one or the other")
    if args.global_temp is None:
        given = [k for k, v in (("--method", args.method != "auto"), ("--moves", args.moves is not None),
                                ("--num-candidates", args.num_candidates is not None)) if v]
        if given:
            p.error(f"{', '.join(given)} only apply with --global-temp")
    from spl.sampling import check_filters

    try:
        check_filters(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as e:  # "top_p must lie in (0, 1], got 2.0": name the flag instead
        name, rest = str(e).split(" ", 1)
        p.error(f"--{name.replace('_', '-')} {rest}")
    if args.global_temp is not None and not (args.global_temp > 0 and math.isfinite(args.global_temp)):
        p.error(f"--global-temp must be a positive number, got {args.global_temp}")
    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_candidates is not None and args.num_candidates < args.num_samples:
        p.error(f"--num-candidates ({args.num_candidates}) must be at least --num-samples "
                f"({args.num_samples}): the samples are drawn from the candidates")
    if args.moves is not None and (args.moves < 0 or args.method == "resample"):
        p.error("--moves must be >= 0, and applies to --method smc (or auto) only")
    if any(not s for s in args.stop):
        p.error("--stop needs a non-empty text")
    for flag, path, kind in (("--checkpoint", args.checkpoint, "dir"), ("--adapter", args.adapter, "dir"),
                             ("--tokenizer", args.tokenizer, "file"),
                             ("--prompts-file", args.prompts_file, "file")):
        if path is not None and not (Path(path).is_dir() if kind == "dir" else Path(path).is_file()):
            p.error(f"{flag} {'directory' if kind == 'dir' else 'file'} not found: {path}"
                    + (" (train first: python train.py)" if flag == "--checkpoint" else ""))
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        p.error(f"--output: directory {Path(args.output).resolve().parent} does not exist")
    if args.device is not None:
        _check_device(p, args.device)
    return args


def _check_device(p: argparse.ArgumentParser, name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        p.error(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        p.error(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {name}: only cpu and cuda are supported")


def read_prompts(args) -> list:
    """Prompts as strings, or as message lists (from JSONL 'messages'); each record checked."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                prompts.append(line)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}, line {n}: invalid JSON ({e.msg})")
            if not isinstance(rec, dict):
                fail(f"{path}, line {n}: expected an object with 'prompt' or 'messages', got a "
                     f"{type(rec).__name__}")
            if isinstance(rec.get("prompt"), str) and "messages" not in rec:
                prompts.append(rec["prompt"])
            elif isinstance(rec.get("messages"), list) and "prompt" not in rec:
                bad = [i for i, m in enumerate(rec["messages"]) if not isinstance(m, dict)
                       or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)]
                if bad or not rec["messages"]:
                    fail(f"{path}, line {n}: 'messages' must be a non-empty list of "
                         f"{{'role': ..., 'content': str}} (message {bad[0] if bad else 0})")
                prompts.append(rec["messages"])
            else:
                fail(f"{path}, line {n}: needs either a 'prompt' string or a 'messages' list")
    return prompts


def peek_checkpoint(args):
    """``--checkpoint``'s InferenceSource (config, tokenizer, base) from its config files, without its
    weights."""
    from spl.checkpoint import CheckpointError
    from spl.inference import inference_source

    try:
        return inference_source(args.checkpoint, args.tokenizer)
    except CheckpointError as e:
        fail(str(e))


def encode_prompts(tok, prompts: list) -> list[list[int]]:
    """A text prompt is one user message: under the "none" template, bos + the text."""
    ids = []
    for i, p in enumerate(prompts):
        try:
            ids.append(tok.encode_prompt(p if isinstance(p, list) else [{"role": "user", "content": p}]))
        except ValueError as e:
            fail(f"prompt {i}: {e}")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    from spl.chat_templates import set_chat_template
    from spl.tokenizer import load_tokenizer

    found = peek_checkpoint(args)
    max_seq_len, tok_path = found.config.max_seq_len, found.tokenizer
    questions = None  # an opinion run's survey questions, when its own are asked (answer tallies)
    if not prompts:
        prompts, questions = default_prompts(Path(args.checkpoint))
    # Prompts, chat template and context checked with the tokenizer alone, before any weights.
    try:
        early = load_tokenizer(tok_path)
        # As the checkpoint was trained to be asked (its run config, tokenizer_config.json, control
        # tokens), or the given template, checked against the tokenizer.
        template = set_chat_template(early, args.chat_template, checkpoint=found.source, base=found.base,
                                     adapter=args.adapter)
    except (ValueError, FileNotFoundError) as e:  # ChatTemplateError is a ValueError
        fail(str(e))
    ids = encode_prompts(early, prompts)
    if max_seq_len is not None and max(map(len, ids)) + args.max_new_tokens > max_seq_len:
        fail(f"--max-new-tokens {args.max_new_tokens} + the longest prompt ({max(map(len, ids))} tokens) "
             f"exceeds the model's context of {max_seq_len} tokens")

    import torch

    from spl.checkpoint import CheckpointError
    from spl.global_temperature import choose_method, default_num_candidates, sample_global_temperature
    from spl.inference import load_for_inference
    from spl.sampling import StopStrings, generate

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
    tok.chat_template, tok.default_system = early.chat_template.name, early.default_system
    print(template, file=sys.stderr)
    if loaded.has_adapter:
        from spl.lora import merge
        merge(model)  # fold the adapters in once: decoding then costs what the base model costs
    ids = encode_prompts(tok, prompts)  # with the tokenizer the loader checked
    stop = StopStrings(tok, args.stop) if args.stop else None
    glob = args.global_temp is not None
    method, per_prompt = "token", args.num_samples  # per prompt: rows decoded together
    if glob:  # auto resolved here so the output names what ran
        method = choose_method(args.global_temp) if args.method == "auto" else args.method
        per_prompt = args.num_candidates or default_num_candidates(args.num_samples, args.global_temp)
    kw = dict(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, eos_id=tok.eos_id, stop=stop,
              max_rows=args.batch_size)
    streaming = sys.stdout.isatty() and not glob and len(ids) * args.num_samples == 1
    out_file = open(args.output, "w") if args.output else None  # noqa: SIM115 (closed below)
    step = max(1, args.batch_size // per_prompt)  # prompts per call
    try:
        for start in range(0, len(ids), step):
            batch = ids[start:start + step]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if not glob:
                        stream = _Streamer(tok, prompts[0]) if streaming else None
                        res = generate(model, batch, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, min_p=args.min_p, seed=args.seed + start,
                                       stream=stream, **kw)
                        if stream is not None:
                            stream.close()
                    else:
                        res = sample_global_temperature(model, batch, args.global_temp, method=method,
                                                        num_candidates=args.num_candidates, moves=args.moves,
                                                        seed=args.seed + start, **kw)
                except ValueError as e:  # what only the loaded model can tell (e.g. its context)
                    fail(str(e))
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            _report(args, tok, stop, prompts, start, len(batch), res, method, glob, streaming, out_file)
            if questions and glob and args.num_samples > 1:
                from spl.demo_answers import answer_tally  # the samples counted beside the exact pi^(1/T)
                k = args.num_samples
                for p in range(len(batch)):
                    log_z = res.diagnostics(p).get("log_z")
                    print(answer_tally(model, tok, questions[start + p], res.tokens[p * k:(p + 1) * k],
                                       args.global_temp, log_z) + "\n")
    finally:
        if out_file:
            out_file.close()
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _report(args, tok, stop, prompts, start, count, res, method, glob, streaming, out_file) -> None:
    """Write each completion's JSON line and show it (with the prompt's sampler diagnostics)."""
    k = args.num_samples
    for p in range(count):
        diag = res.diagnostics(p) if glob else None
        if diag is not None:
            moves = diag["move_acceptance"]
            print(f"[prompt {start + p}] {diag['method']}, n={diag['num_candidates']}: "
                  f"{diag['distinct_samples']} distinct of {k} from {diag['distinct_lineages']} lineages; "
                  f"ESS {diag['ess']:.1f} (lowest per step {diag['min_step_ess']:.1f}); "
                  f"{diag['resamples']} resampling steps"
                  + (f"; moves accepted {moves:.0%}" if moves is not None else ""))
        for j in range(k):
            i = p * k + j
            text = tok.decode([t for t in res.tokens[i] if t != tok.eos_id])
            cut = False
            if stop is not None:
                text, cut = stop.cut(text)
            reason = "stop" if cut else "eos" if bool(res.finished[i]) else "length"
            record = {"prompt": prompts[start + p], "completion": text, "num_tokens": len(res.tokens[i]),
                      "logp": float(res.logps[i]), "finish_reason": reason, "method": method,
                      "temperature": args.global_temp if glob else args.temperature, "sampler": diag}
            if out_file:
                out_file.write(json.dumps(record) + "\n")
            if not streaming:
                header = f"[prompt {start + p}, sample {j}] logp={record['logp']:.2f} ({reason})"
                print(f"{header}\n{_show(prompts[start + p], tok)}{text}\n")


def _show(prompt, tok) -> str:
    """The prompt as printed before its completion: plain text continues as written; under a chat
    template the conversation's turns, one per line, then where the assistant's answer starts."""
    chat = tok.poses_chat
    if isinstance(prompt, str) and not chat:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if chat else "")


class _Streamer:
    """Print text as tokens arrive, in whole characters (spl.tokenizer.TextStream); ``close`` prints
    what is held back when the completion ends at the budget or a stop string instead of eos."""

    def __init__(self, tok, prompt) -> None:
        from spl.tokenizer import TextStream

        self.eos_id, self.text, self.open = tok.eos_id, TextStream(tok), True
        print(_show(prompt, tok), end="", flush=True)

    def __call__(self, t: int) -> None:
        if t == self.eos_id:
            self.close()
        elif self.open:
            print(self.text.push(t), end="", flush=True)

    def close(self) -> None:
        if self.open:
            print(self.text.flush(), flush=True)
            self.open = False


def default_prompts(checkpoint: Path) -> tuple[list[str], list]:
    """An opinion run's own survey questions (the demo's) and the questions; else ask for a prompt."""
    from spl.demo_answers import run_questions
    from spl.inference import resolve_checkpoint

    questions = run_questions(resolve_checkpoint(checkpoint))
    if questions:
        return [q.prompt() for q in questions], questions
    fail("give --prompt or --prompts-file")


if __name__ == "__main__":
    sys.exit(main())
