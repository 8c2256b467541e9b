"""The report's figures, drawn with matplotlib in the layout of the paper's (Fig. 2, 3, 4, 12).

- ``plot_diversity_quality`` (§4.1, Fig. 2): quality against diversity, one line per model or
  method through its temperature sweep, each point labelled with its temperature.
- ``plot_pass_at_k`` (§4.2, Fig. 3): best-of-N accuracy against N on a log2 axis, one panel per
  difficulty split, one line per model and sampling setting.
- ``plot_reliability`` (§4.3, Fig. 4): per-bin accuracy bars under the y = x line, one panel per
  model.
- ``plot_stance_spread`` (App. E, Fig. 12): the per-statement standard deviation of judged
  stances (1-4) as box plots, and its median against coherence (the share of word tokens),
  one line per model through its temperatures.

matplotlib is an evaluation extra (requirements-eval.txt); training and sampling never import
it. Without it ``PlotsUnavailable`` says so and the runner notes the figures as skipped. Each
``figure_*`` builds a Figure (tests inspect its axes, labels and lines); each ``plot_*`` saves one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from spl.extras import ExtraMissing, import_extra


class PlotsUnavailable(ExtraMissing):
    """matplotlib is not installed: the caller skips the figures and says why."""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; ``PlotsUnavailable`` when not installed,
    ``spl.extras.ExtraBroken`` when installed but failing to import."""
    try:
        matplotlib = import_extra("matplotlib", needed_for="figures")
    except ExtraMissing as e:
        raise PlotsUnavailable(str(e), e.package) from None
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    return import_extra("matplotlib.pyplot", needed_for="figures")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _finite(points: Sequence[tuple]) -> list[tuple]:
    """Points whose two coordinates are finite numbers (a metric can be NaN when skipped)."""
    return [p for p in points if p[0] is not None and p[1] is not None
            and math.isfinite(p[0]) and math.isfinite(p[1])]


# ---------------------------------------------------------------------------------------------
# Diversity against quality (Fig. 2)
# ---------------------------------------------------------------------------------------------


def _labelled_lines(ax, runs: Mapping[str, Sequence[tuple[float, float, str]]]) -> None:
    """One line per series through its (x, y, label) points in sweep order; labels beside points."""
    for name, points in runs.items():
        points = _finite(points)
        if not points:
            continue
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for x, y, label in points:
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                            color=line.get_color())
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def figure_diversity_quality(runs: Mapping[str, Sequence[tuple[float, float, str]]], diversity_name: str,
                             quality_name: str, title: str = "Diversity vs quality"):
    """Quality against diversity: one line per model or method, a labelled point per temperature."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.8))
    _labelled_lines(ax, runs)
    ax.set(xlabel=diversity_name, ylabel=quality_name, title=title)
    return fig


def plot_diversity_quality(path: str | Path, runs: Mapping[str, Sequence[tuple[float, float, str]]],
                           diversity_name: str, quality_name: str,
                           title: str = "Diversity vs quality") -> Path:
    return _save(figure_diversity_quality(runs, diversity_name, quality_name, title), path)


# ---------------------------------------------------------------------------------------------
# Best-of-N (Fig. 3)
# ---------------------------------------------------------------------------------------------


def figure_pass_at_k(splits: Mapping[str, Mapping[str, Mapping[int, float]]], title: str = "Best-of-N"):
    """One panel per split ({split: {curve: {k: pass@k}}}), N on a log2 axis, one line per curve."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.8), squeeze=False, sharey=True)
    for ax, (split, curves) in zip(axes[0], splits.items(), strict=True):
        for name, curve in curves.items():
            points = _finite([(k, curve[k]) for k in sorted(curve)])
            if points:
                ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ks = sorted({k for curve in curves.values() for k in curve})
        ax.set_xticks(ks, [str(k) for k in ks])  # 1, 4, 16, 64, 128 as the paper labels N
        ax.set(xlabel="N (samples)", title=split, ylim=(0.0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best-of-N accuracy (pass@N)")
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return fig


def plot_pass_at_k(path: str | Path, splits: Mapping[str, Mapping[str, Mapping[int, float]]],
                   title: str = "Best-of-N") -> Path:
    return _save(figure_pass_at_k(splits, title), path)


# ---------------------------------------------------------------------------------------------
# Calibration (Fig. 4)
# ---------------------------------------------------------------------------------------------


def figure_reliability(models: Mapping[str, Sequence[dict]], title: str = "Reliability"):
    """One reliability diagram per model: accuracy bars per confidence bin, and y = x.

    ``models[name]`` are ``metrics.reliability_bins``; empty bins draw nothing.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(3.8 * len(models), 3.8), squeeze=False, sharey=True)
    for ax, (name, bins) in zip(axes[0], models.items(), strict=True):
        full = [b for b in bins if b["count"]]
        ax.bar([(b["lower"] + b["upper"]) / 2 for b in full], [b["accuracy"] for b in full],
               width=[b["upper"] - b["lower"] for b in full], edgecolor="white", label="accuracy")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return fig


def plot_reliability(path: str | Path, models: Mapping[str, Sequence[dict]],
                     title: str = "Reliability") -> Path:
    return _save(figure_reliability(models, title), path)


# ---------------------------------------------------------------------------------------------
# Political stances (App. E, Fig. 12)
# ---------------------------------------------------------------------------------------------


def figure_stance_spread(spreads: Mapping[str, Sequence[float]],
                         points: Mapping[str, Sequence[tuple[float, float, str]]],
                         title: str = "Political Compass stances"):
    """Left: per-statement stance standard deviations, one box per model and setting (Fig. 12).
    Right: their median against coherence, one line per model through its settings.

    ``spreads[label]`` are per-statement standard deviations; ``points[model]`` are
    (coherence, median spread, setting) in sweep order.
    """
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [label for label, values in spreads.items() if any(map(math.isfinite, values))]
    left.boxplot([[v for v in spreads[label] if math.isfinite(v)] for label in labels],
                 orientation="horizontal")
    left.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
    left.set(xlabel="std of stance (1-4) across responses, per statement", title="Stance spread")
    left.grid(alpha=0.3, axis="x")
    _labelled_lines(right, points)
    right.set(xlabel="coherence (share of word tokens)", ylabel="median stance std",
              title="Spread against coherence")
    fig.suptitle(title)
    return fig


def plot_stance_spread(path: str | Path, spreads: Mapping[str, Sequence[float]],
                       points: Mapping[str, Sequence[tuple[float, float, str]]],
                       title: str = "Political Compass stances") -> Path:
    return _save(figure_stance_spread(spreads, points, title), path)
