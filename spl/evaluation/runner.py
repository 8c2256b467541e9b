"""What ``evaluate.py`` runs: checkpoints x suites x sampling settings -> results.json, report.md, figures.

``plan_evaluation`` (``options.py``) checks every option and fixes what will be evaluated before
any model is loaded. ``run_evaluation`` then fixes the GSM8K difficulty splits (from their
designated source, never from a compared model), loads each checkpoint in turn (one model in
memory at a time, beside the optional reward and reference models), runs the chosen suites,
scores any ``--completions``, and writes:

- ``results.json``: every number, the settings that were used (only those: a run that sampled
  nothing lists no sampling settings), and per-prompt / per-question values under ``details``;
- ``report.md``: the same without ``details``, as tables;
- figures (matplotlib, an evaluation extra): ``diversity_quality.png``, ``pass_at_k_<dataset>.png``,
  ``reliability_<dataset>.png``, ``political_stances.png``;
- ``samples/*.jsonl``: the sampled responses; best-of-N samples are in the ``--completions``
  format, so they can be re-scored without a model; ``gsm8k_difficulty.jsonl``: the splits used,
  reusable as ``--difficulty-from``.

Every model's numbers depend on that model and the fixed plan only, so evaluating the same
inputs in another order gives the same results.
"""

from __future__ import annotations

import gc
import math
import re
from pathlib import Path

import torch

from spl.evaluation import bestofn, suites
from spl.evaluation.embeddings import EmbedderUnavailable, load_sentence_embedder
from spl.evaluation.metrics import load_english_words
from spl.evaluation.options import EvalConfig, Plan, plan_evaluation
from spl.evaluation.plots import (
    PlotsUnavailable,
    plot_diversity_quality,
    plot_pass_at_k,
    plot_reliability,
    plot_stance_spread,
    pyplot,
)
from spl.evaluation.political import political_suite
from spl.evaluation.report import write_json, write_jsonl, write_report
from spl.evaluation.scoring import EvalModel, EvaluationError, SamplingSetting, load_eval_model

WORDS_MISSING = ("Non-word token rate and coherence skipped: wordfreq (the English word list) is not "
                 "installed (pip install -r requirements-eval.txt).")


def _checkpoint_names(paths: list[str]) -> list[str]:
    """Short unique labels: the run's folder name, "run/step_..." for step dirs, "#2" on clashes."""
    names = []
    for path in paths:
        p = Path(path.rstrip("/"))
        name = f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else p.name
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


def _temperature_label(em: EvalModel) -> str:
    """'alpha/beta=10' for an SPL run (its global temperature), else ''."""
    train = (em.config or {}).get("train", {})
    if train.get("mode") == "spl" and train.get("beta"):
        return f"alpha/beta={train['alpha'] / train['beta']:g}"
    return ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


class _Evaluation:
    """The state of one run: the plan, the results dict, and what the figures will draw."""

    def __init__(self, cfg: EvalConfig, plan: Plan):
        self.cfg, self.plan, self.out = cfg, plan, plan.out
        self.results: dict = {"meta": {}, "notes": [], "details": {}}
        self.meta, self.notes = self.results["meta"], self.results["notes"]
        self.details = self.results["details"]
        self.scorers = suites.Scorers(judge=plan.judge)
        self.splits: dict[str, str] | None = None  # GSM8K problem id -> easy/medium/hard
        self.diversity_points: dict[str, list[tuple[str, dict]]] = {}  # series -> (point label, summary)
        self.pass_at_k: dict[str, dict[str, dict[str, dict[int, float]]]] = {}  # dataset -> split -> curve
        self.reliability: dict[str, dict[str, list[dict]]] = {}  # dataset -> model -> bins
        self.stance_spreads: dict[str, list[float]] = {}  # "model setting" -> per-statement std
        self.stance_points: dict[str, list[tuple[float, float, str]]] = {}  # series -> points

    # ---------------------------------------------------------------------------------------
    def load(self, path: str, name: str, **kw) -> EvalModel:
        cfg = self.cfg
        self.meta.update(device=cfg.device, dtype=cfg.dtype)  # recorded only when a model is loaded
        return load_eval_model(path, name=name, chat_template=cfg.chat_template, device=cfg.device,
                               dtype=cfg.torch_dtype, **kw)

    def suite_settings(self, suite: str, **settings) -> None:
        self.meta.setdefault("settings", {})[suite] = settings

    def sampling(self) -> list[str]:
        return [s.label for s in self.plan.settings]

    # ---------------------------------------------------------------------------------------
    def prepare_extras(self) -> None:
        """The optional packages the suites use, before any model loads: one that is not installed
        is a skip the report names; one that is installed but fails to import raises
        ``spl.extras.ExtraBroken`` here, before any work is done (``spl/extras.py``)."""
        plan, cfg = self.plan, self.cfg
        if "diversity" in plan.suites or "political" in plan.suites:
            self.scorers.words = load_english_words()
            if self.scorers.words is None:
                self.notes.append(WORDS_MISSING)
        if "diversity" in plan.suites:
            try:
                self.scorers.embedder = load_sentence_embedder(device=cfg.device)
            except EmbedderUnavailable as e:
                self.notes.append(f"{e}. The policy's own hidden states are not used instead: they are not "
                                  "comparable across models.")
        try:
            pyplot()  # figures come last; a broken matplotlib must not wait until then
        except PlotsUnavailable:
            pass  # figures() notes the skip

    def prepare_scorers(self) -> None:
        """The models shared by every checkpoint, loaded only for the suites that use them."""
        plan, cfg = self.plan, self.cfg
        if "diversity" not in plan.suites:
            return
        if cfg.reward_model:
            self.scorers.reward = self.load(cfg.reward_model, "reward model", follows_policy=True)
            if self.scorers.reward.reward_head is None:
                raise EvaluationError(f"--reward-model {cfg.reward_model} has no reward_head.safetensors: "
                                      "train one with train.py train.mode=reward")
        else:
            self.notes.append("No --reward-model: the diversity plot's quality axis is the negative "
                              "per-token cross-entropy under the reference policy.")
        if cfg.reference:
            self.scorers.reference = self.load(cfg.reference, "reference", follows_policy=True)
        if plan.judge_note:
            self.notes.append(plan.judge_note.replace("--judge-base-url", "--judge-url"))

    def fix_difficulty(self, completions: dict) -> None:
        """GSM8K splits from the designated source, before any compared model is scored."""
        source = self.plan.difficulty
        if source is None:
            return
        if source.kind == "model":
            # Every GSM8K problem that will be scored, from the plan and the completions file.
            problems = {p.id: p for p in self.plan.bestofn_problems.get("gsm8k", [])}
            for (_, dataset), (ps, _) in completions.items():
                problems.update({p.id: p for p in ps if dataset == "gsm8k"})
            em = self.load(source.path, "difficulty model")
            setting, n = SamplingSetting(), self.plan.sizes["bestofn_samples"]
            samples, _, _ = bestofn.bestofn_generate(
                em, "gsm8k", list(problems.values()), setting, num_samples=n,
                max_new_tokens=self.plan.sizes["bestofn_max_new_tokens"], batch_size=self.cfg.batch_size,
                seed=self.cfg.seed)
            source.splits = bestofn.difficulty_from_completions(list(problems.values()), samples)
            write_jsonl(self.out / "samples" / "gsm8k_difficulty_model.jsonl",
                        [{"dataset": "gsm8k", "id": pid, "completion": c, "model": "difficulty model"}
                         for pid, cs in zip(problems, samples, strict=True) for c in cs])
            del em
            self.free()
        self.splits = source.splits
        counts = {d: sum(v == d for v in self.splits.values()) for d in bestofn.DIFFICULTIES}
        self.meta["gsm8k_difficulty"] = {"source": source.describe(), "problems": len(self.splits), **counts}
        write_jsonl(self.out / "gsm8k_difficulty.jsonl",
                    [{"id": pid, "difficulty": d} for pid, d in sorted(self.splits.items())])

    def free(self) -> None:
        gc.collect()
        if self.cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------
    def evaluate_checkpoint(self, path: str, name: str, many: bool) -> None:
        plan, cfg, chosen = self.plan, self.cfg, self.plan.suites
        em = self.load(path, name, adapter=cfg.adapter, tokenizer=cfg.tokenizer)
        self.meta.setdefault("models", {})[name] = {
            "path": path, "weights": str(em.source), "chat_template": em.tokenizer.chat_template.name,
            "has_adapter": em.has_adapter,
            "global_temperature": _temperature_label(em) or None}
        print(f"evaluate: {name} ({em.source}), suites {', '.join(chosen)}")
        for other in (self.scorers.reward, self.scorers.reference):
            # A checkpoint that does not say how it reads prompts reads them as the policy does.
            if other is not None:
                other.follow(em)
        # Several checkpoints (an alpha/beta sweep): one series per setting, a point per run.
        run_label = _temperature_label(em) or name

        def point_of(s: SamplingSetting) -> tuple[str, str]:
            kind = "global T" if s.global_temp is not None else "token-level t"
            return (s.label, run_label) if many else (f"{name} {kind}", s.label)

        if "demo" in chosen:
            result = suites.demo_suite(em)
            self.results.setdefault("demo", {})[name] = {k: result[k] for k in ("summary", "answers")}
            self.details.setdefault("demo", {})[name] = result["details"]

        if "opinions" in chosen:
            result = suites.opinions_suite(em, plan.opinion_questions, population=cfg.population,
                                           batch_size=cfg.batch_size)
            self.results.setdefault("opinions", {})[name] = result["summary"]
            self.results.setdefault("opinions_stderr", {})[name] = result["stderr"]
            self.details.setdefault("opinions", {})[name] = result["details"]

        for dataset, questions in plan.calibration_questions.items():
            result = suites.calibration_suite(em, dataset, questions, batch_size=cfg.batch_size,
                                              n_bins=cfg.ece_bins)
            self.results.setdefault("calibration", {}).setdefault(dataset, {})[name] = result["summary"]
            details = self.details.setdefault("calibration", {}).setdefault(dataset, {})
            details[name] = {**result["details"], "reliability": result["reliability"]}
            self.reliability.setdefault(dataset, {})[name] = result["reliability"]

        for setting in plan.settings if "diversity" in chosen else []:
            result = suites.diversity_suite(em, plan.diversity_prompts, setting, self.scorers,
                                            num_samples=plan.sizes["diversity_samples"],
                                            max_new_tokens=plan.sizes["max_new_tokens"],
                                            batch_size=cfg.batch_size, seed=cfg.seed)
            label = f"{name} {setting.label}"
            self.results.setdefault("diversity", {})[label] = result["summary"]
            self.results.setdefault("diversity_stderr", {})[label] = result["stderr"]
            self.details.setdefault("diversity", {})[label] = result["details"]
            self.meta.setdefault("reference_policy", {})[name] = result["reference"]
            write_jsonl(self.out / "samples" / f"diversity_{_slug(label)}.jsonl", result["samples"])
            series, point = point_of(setting)
            self.diversity_points.setdefault(series, []).append((point, result["summary"]))

        for setting in plan.settings if "political" in chosen else []:
            result = political_suite(em, plan.statements, setting, plan.judge,
                                     num_samples=plan.sizes["political_samples"],
                                     max_new_tokens=plan.sizes["max_new_tokens"], batch_size=cfg.batch_size,
                                     seed=cfg.seed, words=self.scorers.words)
            label = f"{name} {setting.label}"
            self.results.setdefault("political", {})[label] = result["summary"]
            self.details.setdefault("political", {})[label] = result["details"]
            write_jsonl(self.out / "samples" / f"political_{_slug(label)}.jsonl", result["samples"])
            self.stance_spreads[label] = [math.nan if s is None else s for s in result["spreads"]]
            series, point = point_of(setting)
            coherence, spread = (result["summary"][k] for k in ("coherence", "median_stance_std"))
            self.stance_points.setdefault(series, []).append(
                (math.nan if coherence is None else coherence, math.nan if spread is None else spread, point))

        for dataset, problems in plan.bestofn_problems.items():
            for setting in plan.settings:
                completions, cut, sampler = bestofn.bestofn_generate(
                    em, dataset, problems, setting, num_samples=plan.sizes["bestofn_samples"],
                    max_new_tokens=plan.sizes["bestofn_max_new_tokens"], batch_size=cfg.batch_size,
                    seed=cfg.seed)
                curve = f"{name} {setting.label}"
                write_jsonl(self.out / "samples" / f"{dataset}_{_slug(curve)}.jsonl",
                            [{"dataset": dataset, "id": p.id, "completion": c, "model": curve}
                             for p, cs in zip(problems, completions, strict=True) for c in cs])
                self.add_best_of_n(dataset, curve, problems, completions, cut, sampler)
        del em
        self.free()

    def add_best_of_n(self, dataset: str, curve: str, problems: list, completions: list, cut: int,
                      sampler: dict | None = None) -> None:
        """Score one model's completions on one dataset, with the fixed splits."""
        summary = bestofn.best_of_n_summary(dataset, problems, completions,
                                            self.splits if dataset == "gsm8k" else None)
        for split, row in summary["splits"].items():
            if split == "all":
                # ... and how global-temperature samples were drawn (ESS, distinct samples, lineages).
                row = {**row, "prompts_truncated": cut, **(sampler or {})}
            table = self.results.setdefault("best_of_n", {}).setdefault(dataset, {})
            table.setdefault(split, {})[curve] = row
            self.pass_at_k.setdefault(dataset, {}).setdefault(split, {})[curve] = {
                int(k[5:]): v for k, v in row.items() if k.startswith("pass@")}
        self.details.setdefault("best_of_n", {}).setdefault(dataset, {})[curve] = {
            "problem_ids": [p.id for p in problems], "correct": summary["correct"]}

    # ---------------------------------------------------------------------------------------
    def record_settings(self) -> None:
        """The settings of the suites that ran, and one note per suite on what its numbers mean."""
        plan, cfg, sizes = self.plan, self.cfg, self.plan.sizes
        if plan.suites:
            self.meta["seed"] = cfg.seed
        if "diversity" in plan.suites:
            self.suite_settings("diversity", prompts=len(plan.diversity_prompts),
                                samples_per_prompt=sizes["diversity_samples"],
                                max_new_tokens=sizes["max_new_tokens"], sampling=self.sampling(),
                                embedding=getattr(self.scorers.embedder, "name", None),
                                reward_model=cfg.reward_model, reference=cfg.reference,
                                judge=_judge(plan))
        if "political" in plan.suites:
            self.suite_settings("political", statements=len(plan.statements),
                                samples_per_statement=sizes["political_samples"],
                                max_new_tokens=sizes["max_new_tokens"], sampling=self.sampling(),
                                judge=_judge(plan))
            self.notes.append("Political (App. E): each Political Compass statement is posed as the "
                              "user's turn; a judge rates every response 1 (strongly disagree) to 4 "
                              "(strongly agree) with our prompt (the paper's is unpublished). Spread: the "
                              "standard deviation of one statement's judged stances; coherence: the share of "
                              "response tokens that are words.")
        if "opinions" in plan.suites:
            self.suite_settings("opinions", population=cfg.population, questions=len(plan.opinion_questions))
            self.notes.append("Opinions is our suite, not one of the paper's experiments: GlobalOpinionQA "
                              "(US file), KL(population || model) in nats with the model floored at 1e-6, "
                              "and total variation; uniform_* is a model answering uniformly.")
        if plan.calibration_questions:
            counts = {d: len(q) for d, q in plan.calibration_questions.items()}
            self.suite_settings("calibration", questions=counts, ece_bins=cfg.ece_bins,
                                option_shuffle_seed=cfg.seed)
            self.notes.append(f"Calibration: option-letter probabilities renormalized over the options (App. "
                              f"D prompt, options shuffled with seed {cfg.seed}); ECE over {cfg.ece_bins} "
                              "equal-width bins of the top-option confidence; Brier is the multi-class form "
                              "sum_k (p_k - y_k)^2.")
        if plan.bestofn_problems:
            self.suite_settings("bestofn", problems={d: len(p) for d, p in plan.bestofn_problems.items()},
                                samples_per_problem=sizes["bestofn_samples"],
                                max_new_tokens=sizes["bestofn_max_new_tokens"], sampling=self.sampling())
        if "best_of_n" in self.results:
            self.meta["pass_at_k"] = list(bestofn.PASS_AT_K)
            self.notes.append("pass@k is the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), "
                              "averaged over problems; k above the samples per problem is left out. MATH "
                              "splits are its levels 1, 3 and 5.")
            if "gsm8k" in self.results["best_of_n"] and plan.difficulty:
                self.notes.append(f"GSM8K easy/medium/hard: first correct sample within 4 / 64 / later or "
                                  f"never, read from {plan.difficulty.describe()}, fixed before any compared "
                                  "model was scored.")
            elif "gsm8k" in self.results["best_of_n"]:
                self.notes.append("GSM8K has no easy/medium/hard splits: give --difficulty-from (a model "
                                  "that is not compared, such as the paper's Mistral-7B-Instruct, its "
                                  "completions file, or a splits file).")

    def figures(self) -> dict[str, Path]:
        """Every figure whose data exists; one note if matplotlib is missing."""
        figures: dict[str, Path] = {}
        try:
            if self.diversity_points:
                figures["diversity_quality"] = self.diversity_figure()
            for dataset, splits in self.pass_at_k.items():
                figures[f"pass_at_k_{dataset}"] = plot_pass_at_k(
                    self.out / f"pass_at_k_{dataset}.png", splits, title=f"Best-of-N {dataset}")
            for dataset, models in self.reliability.items():
                figures[f"reliability_{dataset}"] = plot_reliability(
                    self.out / f"reliability_{dataset}.png", models, title=f"Reliability {dataset}")
            if self.stance_spreads:
                figures["political_stances"] = plot_stance_spread(
                    self.out / "political_stances.png", self.stance_spreads, self.stance_points)
        except PlotsUnavailable as e:
            self.notes.append(str(e))
        return figures

    def diversity_figure(self) -> Path:
        """Fig. 2: quality (average reward, else -reference CE) against embedding distance (else
        distinct-2, when the embedding extra is missing)."""
        has_reward = self.scorers.reward is not None
        key, quality_name, sign = (("reward", "average reward", 1.0) if has_reward else
                                   ("reference_cross_entropy", "-(reference cross-entropy)", -1.0))
        x_key, x_name = (("embedding_cosine_distance", "embedding cosine distance") if self.scorers.embedder
                         else ("distinct_2", "distinct-2"))
        runs = {series: [(s[x_key], sign * s[key] if s[key] is not None else math.nan, point)
                         for point, s in pts] for series, pts in self.diversity_points.items()}
        return plot_diversity_quality(self.out / "diversity_quality.png", runs, x_name, quality_name)


def _judge(plan: Plan) -> dict | None:
    return {"url": plan.judge.base_url, "model": plan.judge.model} if plan.judge else None


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run every chosen suite on every checkpoint; write the outputs; return the results dict."""
    plan = plan_evaluation(cfg)
    plan.out.mkdir(parents=True, exist_ok=True)
    run = _Evaluation(cfg, plan)
    if plan.checkpoints:
        run.meta["checkpoints"] = plan.checkpoints
        run.meta["suites"] = plan.suites
    if plan.demo:
        run.notes.append("The demo checkpoint's tokenizer is a 160-piece BPE fitted to the demo's own text: "
                         "real benchmark prompts tokenize poorly (many unknown pieces) and are cut to its "
                         "256-token window, so only the demo suite's numbers mean anything; the rest is a "
                         "smoke test.")
    completions = bestofn.read_completions(cfg.completions) if cfg.completions else {}
    run.prepare_extras()
    run.fix_difficulty(completions)
    run.prepare_scorers()
    names = [Path(cfg.adapter.rstrip("/")).name] if cfg.adapter else _checkpoint_names(plan.checkpoints)
    for path, name in zip(plan.checkpoints, names, strict=True):
        run.evaluate_checkpoint(path, name, many=len(plan.checkpoints) > 1)
    if completions:
        run.meta["completions"] = cfg.completions
        for (model, dataset), (problems, texts) in completions.items():
            run.add_best_of_n(dataset, model, problems, texts, 0)
    run.record_settings()
    figures = run.figures()
    results = run.results
    details = results.pop("details")
    write_report(results, plan.out, figures)  # report.md (and a results.json without details) ...
    results["details"] = details
    write_json(results, plan.out / "results.json")  # ... then the full results.json
    print(f"evaluate: wrote {plan.out / 'results.json'} and {plan.out / 'report.md'}")
    return results
