"""Evaluate checkpoints: diversity and quality, best-of-N, calibration, political stances (paper §4,
App. B-E), and opinions (ours).

    python evaluate.py                                    # runs/demo: demo, opinions, diversity (CPU)
    python evaluate.py --checkpoint runs/spl_a1.2 --checkpoint runs/dpo --suite diversity \\
        --reward-model runs/rm --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini
    python evaluate.py --checkpoint runs/dpo --checkpoint runs/spl --suite bestofn --temperature 1,1.2 \\
        --difficulty-from models/Mistral-7B-Instruct-v0.2   # GSM8K splits from a model not compared
    python evaluate.py --checkpoint runs/spl --suite bestofn --global-temp 1.2 --method resample
    python evaluate.py --checkpoint runs/spl --suite calibration --datasets mmlu,truthfulqa
    python evaluate.py --checkpoint runs/dpo --suite political --temperature 1,1.4 \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini
    python evaluate.py --completions samples.jsonl        # score GSM8K/MATH completions made elsewhere

Outputs go to --out (default <first checkpoint>/eval): results.json (every number and the settings
used), report.md, figures (diversity_quality.png, pass_at_k_<dataset>.png, reliability_<dataset>.png,
political_stances.png; need requirements-eval.txt) and samples/*.jsonl.

--completions FILE.jsonl holds one object per line:
    {"dataset": "gsm8k" | "math", "id": "gsm8k-12" (or "problem": "<exact problem text>"),
     "completion": "<generated text after the prompt>", "answer": "<gold, optional>",
     "model": "<curve label, optional>"}
Problems are looked up in data/ by id (GSM8K "gsm8k-<line index>", MATH-500 "unique_id") or by text
unless "answer" is given; each line is one of that problem's n samples for pass@k.

--difficulty-from sets GSM8K's easy/medium/hard splits (first correct sample within 4 / 64 / later):
a model directory (sampled here), a completions file of one model (format above), or a splits file
of {"id": "gsm8k-12", "difficulty": "easy"} lines (each run writes gsm8k_difficulty.jsonl). It must
not be a compared model. Without it GSM8K has no splits.
"""

import argparse
import sys


def _float_list(text: str) -> list[float]:
    """A comma-separated list of numbers ("1,1.2")."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _flat(values: list[list[float]] | None) -> list[float]:
    return [v for item in values or [] for v in item]


def _words(values: list[str] | None) -> list[str] | None:
    return None if values is None else [v.strip() for item in values for v in item.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", action="append", metavar="PATH",
                   help="run dir (its latest checkpoint), step dir, or HF/original model dir; repeat for a "
                        "sweep (default: runs/demo)")
    g.add_argument("--adapter", metavar="DIR", help="extra PEFT adapter over a single --checkpoint")
    g.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer.model or tokenizer.json (default: the checkpoint's own)")
    g.add_argument("--chat-template", default="auto",
                   help="how prompts are posed: auto (as each checkpoint was trained: its run config, "
                        "tokenizer_config.json or control tokens), mistral-v1, mistral-v3, zephyr, "
                        "chatml, none (plain text)")
    g.add_argument("--reward-model", metavar="PATH", help="reward-mode run (train.mode=reward) for the "
                   "average-reward quality metric")
    g.add_argument("--reference", metavar="PATH", help="reference policy for the cross-entropy metric "
                   "(default: the policy with adapters disabled, else the policy itself)")
    g.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto",
                   help="weights dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    g = p.add_argument_group("what to run")
    g.add_argument("--suite", action="append", metavar="NAME",
                   help="demo, opinions, diversity, bestofn, calibration, political (repeat or comma list; "
                        "default for the demo run: demo,opinions,diversity)")
    g.add_argument("--datasets", action="append", metavar="LIST",
                   help="gsm8k,math (bestofn) and mmlu,truthfulqa (calibration); default: all")
    g.add_argument("--completions", metavar="FILE.jsonl", help="score GSM8K/MATH completions generated "
                   "elsewhere (format above); alone, no model is loaded")
    g.add_argument("--difficulty-from", metavar="PATH", help="GSM8K difficulty splits from a model dir, a "
                   "completions file or a splits file (see above); never from a compared model")
    g.add_argument("--out", metavar="DIR",
                   help="output folder (default: <first checkpoint>/eval, or runs/eval)")
    g = p.add_argument_group("sizes (unset: demo sizes for the demo run, the paper's otherwise; never "
                             "shrunk silently: asking for more than is shipped is an error)")
    g.add_argument("--num-samples", type=int, help="responses per prompt: diversity (16), political "
                   "(demo 8, else 32)")
    g.add_argument("--num-prompts", type=int, help="diversity prompts (demo 4, else 500)")
    g.add_argument("--limit", type=int,
                   help="items per dataset: bestofn problems (demo 10, else 200; MATH drawn from its "
                        "levels 1, 3, 5), calibration and opinion questions (demo 20, else all), political "
                        "statements (demo 4, else all 62)")
    g.add_argument("--bestofn-samples", type=int, help="completions per problem (demo 8, else 128)")
    g.add_argument("--max-new-tokens", type=int, help="response budget (demo 32; else 256 for diversity, "
                   "512 for bestofn)")
    g.add_argument("--batch-size", type=int, default=32, help="rows per forward or sampling call (32)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", action="append", type=_float_list, metavar="T",
                   help="token-level temperature(s), repeat or comma list: one result per value (1)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--global-temp", action="append", type=_float_list, metavar="T",
                   help="sample pi^(1/T) over whole sequences instead (repeat or comma list)")
    g.add_argument("--method", default="auto",
                   help="global-temperature sampler: auto (spl.global_temperature.choose_method), smc, "
                   "resample")
    g.add_argument("--num-candidates", type=int, help="global-temperature candidates per prompt "
                   "(default max(16, 4 x samples))")
    g.add_argument("--seed", type=int, default=0, help="sampling, subsets and option shuffles (0)")
    g = p.add_argument_group("metrics")
    g.add_argument("--judge-url", "--judge-base-url", dest="judge_url", metavar="URL",
                   help="OpenAI-compatible endpoint (up to /chat/completions) for the LLM-judge metrics and "
                        "the political suite's stance ratings")
    g.add_argument("--judge-model", help="judge model name, e.g. gpt-4o-mini")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (never printed)")
    g.add_argument("--population", default="United States", help="GlobalOpinionQA population (opinions)")
    g.add_argument("--opinions-file", metavar="FILE.jsonl",
                   help="opinion questions in GlobalOpinionQA's format (default: the shipped US file; "
                   "experiments/opinions.py writes its own)")
    g.add_argument("--ece-bins", type=int, default=10, help="equal-width confidence bins for ECE (10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # Imported after parsing so --help answers without loading torch.
    from spl.checkpoint import CheckpointError
    from spl.data import DataError
    from spl.evaluation.judge import JudgeError
    from spl.evaluation.options import EvalConfig
    from spl.evaluation.runner import run_evaluation
    from spl.evaluation.scoring import EvaluationError
    from spl.extras import ExtraBroken

    try:
        cfg = EvalConfig(
            checkpoints=args.checkpoint or [], adapter=args.adapter, tokenizer=args.tokenizer,
            chat_template=args.chat_template, suites=_words(args.suite), out=args.out,
            num_samples=args.num_samples, bestofn_samples=args.bestofn_samples, num_prompts=args.num_prompts,
            limit=args.limit, max_new_tokens=args.max_new_tokens,
            temperatures=_flat(args.temperature) or [1.0], top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, global_temps=_flat(args.global_temp), method=args.method,
            num_candidates=args.num_candidates, seed=args.seed, reward_model=args.reward_model,
            reference=args.reference, judge_url=args.judge_url, judge_model=args.judge_model,
            judge_key_env=args.judge_key_env, completions=args.completions,
            difficulty_from=args.difficulty_from,
            datasets=_words(args.datasets) or ["gsm8k", "math", "mmlu", "truthfulqa"],
            population=args.population, opinions_file=args.opinions_file, ece_bins=args.ece_bins,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        run_evaluation(cfg)
    except (EvaluationError, CheckpointError, DataError, JudgeError, ExtraBroken, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
