"""Every evaluate.py setting, checked in one place, and the plan they resolve to.

``EvalConfig`` holds each option with its default; ``__post_init__`` checks what an option
means on its own (ranges, choices, combinations). ``plan_evaluation`` then checks what depends
on the files named (checkpoints, the suites a run gets by default, how much data is shipped,
the judge's key) and fixes exactly what will be evaluated: the problems, questions, prompts and
statements, the sizes, the sampling settings and the GSM8K difficulty source. Both run before
any model is loaded, so a bad flag costs no loading time; argparse only parses types.

Sizes left unset get the embedded demo's CPU sizes on the demo run and the paper's otherwise
(``SIZES``). ``--limit N`` means N: a request for more than is shipped is refused, not shrunk.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spl.chat_templates import CHOICES as CHAT_TEMPLATES
from spl.evaluation import datasets
from spl.evaluation.bestofn import BESTOFN_DATASETS, DifficultySource, read_difficulty_source
from spl.evaluation.judge import JudgeClient, JudgeUnavailable
from spl.evaluation.scoring import EvaluationError, Prompt, SamplingSetting, is_demo_config, read_run_config

SUITES = ("demo", "opinions", "diversity", "bestofn", "calibration", "political")
DEMO_SUITES = ["demo", "opinions", "diversity"]
# The demo run with no sampling flag: diversity against quality as curves, token-level and global.
DEMO_TEMPERATURES = (0.5, 1.0, 1.5, 2.0)
DEMO_GLOBAL_TEMPS = (1.0, 1.5, 2.0, 3.0)
CALIBRATION_DATASETS = ("mmlu", "truthfulqa")
DATASETS = BESTOFN_DATASETS + CALIBRATION_DATASETS
MATH_LEVELS = {1, 3, 5}  # §4.2: the paper's easy, medium and hard MATH problems
# Sizes when a flag is left unset: (embedded demo on CPU, any other checkpoint = the paper's).
SIZES = {
    "num_prompts": (4, 500),  # diversity prompts (§4.1: 500 held-out HH-RLHF inputs)
    "diversity_samples": (16, 16),  # responses per diversity prompt (§4.1)
    "limit": (20, None),  # questions per calibration/opinion dataset (None: all shipped)
    "bestofn_limit": (10, 200),  # best-of-N problems per dataset (§4.2: 200)
    "bestofn_samples": (8, 128),  # completions per best-of-N problem (§4.2: 128)
    "political_limit": (4, None),  # Political Compass statements (App. E: all of them)
    "political_samples": (8, 32),  # responses per statement (App. E: 32)
    "max_new_tokens": (32, 256),  # diversity and political response budget
    "bestofn_max_new_tokens": (32, 512),  # a worked solution needs more room
}
# Which flag sets which size (--num-samples and --limit apply to several suites).
_FLAG_OF = {"diversity_samples": "num_samples", "political_samples": "num_samples", "bestofn_limit": "limit",
            "political_limit": "limit", "bestofn_max_new_tokens": "max_new_tokens"}


@dataclass
class EvalConfig:
    """Every evaluate.py setting; ``None`` means "the default for this checkpoint" (see ``SIZES``)."""

    checkpoints: list[str] = field(default_factory=list)  # empty: runs/demo (unless --completions alone)
    adapter: str | None = None  # an extra PEFT adapter over the (single) checkpoint
    tokenizer: str | None = None
    chat_template: str = "auto"  # auto (as each checkpoint was trained) or a name in spl.chat_templates
    suites: list[str] | None = None
    out: str | None = None
    num_samples: int | None = None  # responses per prompt: diversity (16) and political (32)
    bestofn_samples: int | None = None
    num_prompts: int | None = None
    limit: int | None = None  # per dataset: best-of-N problems, calibration/opinion questions, statements
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
    difficulty_from: str | None = None  # GSM8K splits: a model, a completions file or a fixed file
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    population: str = "United States"
    opinions_file: str | None = None  # GlobalOpinionQA-format questions (default: the shipped US file)
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
        if unknown or not self.datasets:
            raise EvaluationError(f"unknown dataset(s) {unknown}; choose from {', '.join(DATASETS)}")
        for name in ("num_samples", "bestofn_samples", "num_prompts", "limit", "max_new_tokens", "batch_size",
                     "ece_bins", "top_k", "num_candidates"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        temperatures_ok = all(t >= 0 for t in self.temperatures) and all(t > 0 for t in self.global_temps)
        if not self.temperatures or not temperatures_ok:
            raise EvaluationError("temperatures must be >= 0 (token level) and > 0 (global)")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise EvaluationError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        filters = (self.top_k, self.top_p, self.min_p)
        token_level = self.temperatures != [1.0] or any(v is not None for v in filters)
        if self.global_temps and token_level:
            raise EvaluationError("--global-temp samples pi^(1/T) from the untempered model: it cannot be "
                                  "combined with --temperature, --top-k, --top-p or --min-p")
        if self.method not in ("auto", "smc", "resample"):
            raise EvaluationError(f"--method must be auto, smc or resample, got {self.method!r}")
        if self.adapter is not None and len(self.checkpoints) > 1:
            raise EvaluationError("--adapter goes over a single --checkpoint (its base model)")
        if self.chat_template not in CHAT_TEMPLATES:
            raise EvaluationError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, "
                                  f"got {self.chat_template!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise EvaluationError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device.startswith("cuda") else "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def settings(self) -> list[SamplingSetting]:
        """One sampling setting per temperature (token level) or per global temperature."""
        if self.global_temps:
            return [SamplingSetting(global_temp=t, method=self.method, num_candidates=self.num_candidates)
                    for t in self.global_temps]
        return [SamplingSetting(t, self.top_k, self.top_p, self.min_p) for t in self.temperatures]


@dataclass
class Plan:
    """What one evaluation will do, fixed before any model is loaded."""

    checkpoints: list[str]
    configs: list[dict | None]  # each checkpoint's training config.yaml (None for a bare model dir)
    demo: bool  # every checkpoint is train.py's embedded demo
    suites: list[str]
    out: Path
    sizes: dict[str, int | None]
    settings: list[SamplingSetting]
    # The items each suite evaluates, drawn once with the seed, identical for every checkpoint.
    diversity_prompts: list[Prompt] = field(default_factory=list)
    bestofn_problems: dict[str, list[datasets.MathProblem]] = field(default_factory=dict)
    calibration_questions: dict[str, list[datasets.MultipleChoice]] = field(default_factory=dict)
    opinion_questions: list[datasets.OpinionQuestion] = field(default_factory=list)
    statements: list[datasets.Proposition] = field(default_factory=list)
    judge: JudgeClient | None = None
    judge_note: str | None = None  # why the judge metrics are skipped
    difficulty: DifficultySource | None = None


def select(items: Sequence, limit: int | None, seed: int, what: str) -> list:
    """Exactly ``limit`` items drawn with a seeded generator, in their original order (all if None).

    The same seed picks the same items for every checkpoint, so their numbers compare. Asking
    for more than exist is an error naming how many there are, never a silent smaller run.
    """
    if limit is None:
        return list(items)
    if limit > len(items):
        raise EvaluationError(f"--limit {limit}: only {len(items)} {what} are shipped")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _exists(path: str | None, flag: str, hint: str = "") -> None:
    if path is not None and not Path(path).exists():
        raise EvaluationError(f"{flag} {path}: not found{hint}")


def plan_evaluation(cfg: EvalConfig) -> Plan:
    """Resolve ``cfg`` against the files it names; every check that needs them happens here."""
    checkpoints = list(cfg.checkpoints) or ([] if cfg.completions and not cfg.suites else ["runs/demo"])
    for path in checkpoints:
        _exists(path, "--checkpoint", " (train it first: python train.py)" if path == "runs/demo" else "")
    for path, flag in ((cfg.adapter, "--adapter"), (cfg.tokenizer, "--tokenizer"),
                       (cfg.reward_model, "--reward-model"), (cfg.reference, "--reference"),
                       (cfg.completions, "--completions"), (cfg.difficulty_from, "--difficulty-from"),
                       (cfg.opinions_file, "--opinions-file")):
        _exists(path, flag)
    configs = [read_run_config(c) for c in checkpoints]
    demo = bool(checkpoints) and all(is_demo_config(c) for c in configs)
    suites = cfg.suites
    if suites is None:
        if checkpoints and not demo:
            raise EvaluationError("name the suites to run with --suite (" + ", ".join(SUITES) + "); only the "
                                  "embedded demo run has a default")
        suites = DEMO_SUITES if checkpoints else []
    if suites and not checkpoints:
        raise EvaluationError(f"suites {suites} need a --checkpoint")
    sizes = {name: getattr(cfg, _FLAG_OF.get(name, name)) for name in SIZES}
    sizes = {name: SIZES[name][0 if demo else 1] if v is None else v for name, v in sizes.items()}
    out = Path(cfg.out or (Path(checkpoints[0]) / "eval" if checkpoints else "runs/eval"))
    settings = cfg.settings()
    if demo and settings == [SamplingSetting()]:  # no sampling flag: a curve per kind of temperature
        settings = [SamplingSetting(t) for t in DEMO_TEMPERATURES] + [
            SamplingSetting(global_temp=t, method=cfg.method, num_candidates=cfg.num_candidates)
            for t in DEMO_GLOBAL_TEMPS]
    plan = Plan(checkpoints, configs, demo, list(suites), out, sizes, settings)

    # The LLM judge: optional for diversity (its metrics are then skipped), required for political.
    if "diversity" in suites or "political" in suites:
        try:
            plan.judge = JudgeClient.from_settings(cfg.judge_url, cfg.judge_model, cfg.judge_key_env)
        except JudgeUnavailable as e:
            if "political" in suites:
                raise EvaluationError(f"the political suite needs the LLM judge: {e}".replace(
                    "LLM-judge metrics skipped: ", "")) from None
            plan.judge_note = str(e)
        except ValueError as e:
            raise EvaluationError(str(e)) from None

    if "diversity" in suites:
        if sizes["diversity_samples"] < 2:
            raise EvaluationError("the diversity suite compares responses: --num-samples must be at least 2")
        if plan.judge is not None and sizes["diversity_samples"] < 4:
            raise EvaluationError("the LLM-judge metrics rate pools of 4 responses: use --num-samples >= 4 "
                                  "(or leave out --judge-url)")
        hh = datasets.load_hh_rlhf()
        plan.diversity_prompts = [Prompt.hh_dialogue(d.id, d.prompt)
                                  for d in select(hh, sizes["num_prompts"], cfg.seed, "HH-RLHF test prompts")]
    if "political" in suites:
        if sizes["political_samples"] < 2:
            raise EvaluationError("the political suite measures the spread of stances: --num-samples must be "
                                  "at least 2")
        plan.statements = select(datasets.load_political_compass(), sizes["political_limit"], cfg.seed,
                                 "Political Compass statements")
    if "opinions" in suites:
        questions = [q for q in datasets.load_global_opinions(cfg.opinions_file)
                     if cfg.population in q.distributions]
        if not questions:
            raise EvaluationError(f"no GlobalOpinionQA question carries a distribution for population "
                                  f"{cfg.population!r}")
        plan.opinion_questions = select(questions, sizes["limit"], cfg.seed,
                                        f"GlobalOpinionQA questions for {cfg.population}")
    if "calibration" in suites:
        for name in (d for d in cfg.datasets if d in CALIBRATION_DATASETS):
            # Options are shuffled with the seed (TruthfulQA lists the right answer first).
            loaded = (datasets.load_mmlu(shuffle_seed=cfg.seed) if name == "mmlu"
                      else datasets.load_truthfulqa_mc1(shuffle_seed=cfg.seed))
            plan.calibration_questions[name] = select(loaded, sizes["limit"], cfg.seed, f"{name} questions")
    if "bestofn" in suites:
        for name in (d for d in cfg.datasets if d in BESTOFN_DATASETS):
            # MATH: a random subset of all level 1, 3 and 5 problems; each keeps its level split.
            pool = datasets.load_gsm8k() if name == "gsm8k" else datasets.load_math(levels=MATH_LEVELS)
            what = "GSM8K test problems" if name == "gsm8k" else "MATH-500 problems at levels 1, 3 and 5"
            plan.bestofn_problems[name] = select(pool, sizes["bestofn_limit"], cfg.seed, what)

    if cfg.difficulty_from is not None:
        if "gsm8k" not in plan.bestofn_problems and not cfg.completions:
            raise EvaluationError("--difficulty-from sets the GSM8K easy/medium/hard splits: use it with "
                                  "--suite bestofn on gsm8k, or with --completions")
        compared = {Path(p).resolve() for p in checkpoints + ([cfg.completions] if cfg.completions else [])}
        if Path(cfg.difficulty_from).resolve() in compared:
            raise EvaluationError(f"--difficulty-from {cfg.difficulty_from} is one of the compared models: "
                                  "splits taken from a compared model's samples make it look worse on its "
                                  "own 'hard' split by selection alone; use another model or a fixed file")
        plan.difficulty = read_difficulty_source(cfg.difficulty_from)
    return plan
