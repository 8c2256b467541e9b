"""The report's figures (spl/evaluation/plots.py, matplotlib): what each figure draws, and the files.

The figures are checked as matplotlib objects (axis labels, one line per model, legends, log2
axis, panels per split) and as PNG files read back by matplotlib. CI installs matplotlib
(requirements-eval.txt), so these tests run there.
"""

import sys

import numpy as np
import pytest

from spl.evaluation.metrics import reliability_bins
from spl.evaluation.plots import (
    PlotsUnavailable,
    figure_diversity_quality,
    figure_pass_at_k,
    figure_reliability,
    figure_stance_spread,
    plot_diversity_quality,
    plot_pass_at_k,
    plot_reliability,
    plot_stance_spread,
)
from tests.eval_extras import require_extra


@pytest.fixture(scope="module")
def plt():
    require_extra("matplotlib")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_diversity_quality_figure(plt):
    runs = {"SPL": [(0.2, 0.5, "a/b=1"), (0.3, 0.45, "a/b=2"), (float("nan"), 0.4, "a/b=4")],
            "DPO": [(0.2, 0.5, "t=1"), (0.25, 0.3, "t=1.4")]}
    fig = figure_diversity_quality(runs, "embedding cosine distance", "average reward")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "embedding cosine distance" and ax.get_ylabel() == "average reward"
    assert _legend(ax) == ["SPL", "DPO"] and len(ax.lines) == 2  # one line per model
    spl = ax.lines[0]
    assert list(spl.get_xdata()) == [0.2, 0.3]  # the NaN point is left out
    assert {t.get_text() for t in ax.texts} == {"a/b=1", "a/b=2", "t=1", "t=1.4"}
    plt.close(fig)


def test_pass_at_k_figure(plt):
    splits = {"easy": {"DPO t=1": {1: 0.6, 4: 0.9}, "SPL": {1: 0.5, 4: 0.95}},
              "hard": {"DPO t=1": {1: 0.1, 4: 0.2}, "SPL": {1: 0.1, 4: float("nan")}}}
    fig = figure_pass_at_k(splits, title="GSM8K")
    assert [ax.get_title() for ax in fig.axes] == ["easy", "hard"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    assert fig.axes[0].get_ylabel() == "best-of-N accuracy (pass@N)"
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert _legend(fig.axes[0]) == ["DPO t=1", "SPL"]
    assert list(fig.axes[1].lines[1].get_xdata()) == [1]
    plt.close(fig)


def test_reliability_and_stance_figures(plt):
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 200)
    bins = reliability_bins(confidence, rng.uniform(size=200) < confidence)
    fig = figure_reliability({"DPO": bins, "SPL": bins})
    assert [ax.get_title() for ax in fig.axes] == ["DPO", "SPL"]
    assert len(fig.axes[0].patches) == sum(b["count"] > 0 for b in bins)  # one bar per filled bin
    plt.close(fig)

    spreads = {"DPO t=1": [0.0, 0.5, 0.4], "DPO t=1.4": [0.9, 1.1, 0.7],
               "SPL a/b=2": [0.8, 1.0, float("nan")]}
    points = {"DPO": [(0.99, 0.4, "t=1"), (0.90, 0.9, "t=1.4")], "SPL": [(0.98, 0.9, "a/b=2")]}
    fig = figure_stance_spread(spreads, points)
    boxes, scatter = fig.axes
    assert [t.get_text() for t in boxes.get_yticklabels()] == list(spreads)
    assert scatter.get_xlabel() == "coherence (share of word tokens)"
    assert len(scatter.lines) == 2 and _legend(scatter) == ["DPO", "SPL"]
    plt.close(fig)


def test_files_are_pngs(plt, tmp_path):
    paths = [
        plot_diversity_quality(tmp_path / "dq.png", {"a": [(0.3, 0.3, "x")]}, "d", "q"),
        plot_pass_at_k(tmp_path / "pk.png", {"all": {"m": {1: 0.2, 16: 0.8}}}),
        plot_reliability(tmp_path / "rel.png", {"m": reliability_bins([0.9, 0.2], [True, False])}),
        plot_stance_spread(tmp_path / "st.png", {"m t=1": [0.5, 0.7]}, {"m": [(0.95, 0.6, "t=1")]}),
    ]
    for path in paths:
        image = plt.imread(path)  # (H, W, 4) floats in [0, 1]
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert plt.get_fignums() == []  # every figure was closed


def test_missing_matplotlib_is_a_clear_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotsUnavailable, match="matplotlib is not installed"):
        figure_pass_at_k({"all": {}})
