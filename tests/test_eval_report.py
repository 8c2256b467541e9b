"""Results JSON and Markdown report (spl/evaluation/report.py)."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from spl.evaluation.report import render_markdown, to_jsonable, write_report


@dataclass
class Point:
    x: float
    label: str


RESULTS = {
    "meta": {"policy": "runs/spl-2", "seed": 0, "temperatures": [1.0, 1.5]},
    "notes": ["LLM-judge metrics skipped: no judge endpoint configured"],
    "diversity": {
        "DPO t=1": {"cosine_distance": np.float32(0.25), "distinct_2": 0.5, "reward": float("nan")},
        "SPL a/b=2": {"cosine_distance": 0.375, "distinct_2": 0.625, "self_bleu": 0.125},
    },
    "best_of_n": {"gsm8k": {"n": np.int64(16), "pass_at_k": {"1": 0.2, "4": 0.5},
                            "per_problem": list(range(40))}},
    "calibration": {"mmlu": {"accuracy": 0.5,
                             "reliability": [{"lower": 0.0, "upper": 0.5, "count": 3},
                                             {"lower": 0.5, "upper": 1.0, "count": 1}]}},
    "points": [Point(1.5, "T=1.5")],
}


def test_to_jsonable():
    out = to_jsonable({"a": np.arange(3), "b": (np.float64(1.5), math.inf), "c": np.bool_(True),
                       "d": Point(2, "x")})
    assert out == {"a": [0, 1, 2], "b": [1.5, None], "c": True, "d": {"x": 2, "label": "x"}}
    with pytest.raises(TypeError, match="cannot write object"):
        to_jsonable({"bad": object()})


def test_write_report(tmp_path):
    (tmp_path / "plots").mkdir()
    json_path, md_path = write_report(RESULTS, tmp_path, figures={"pass@k": tmp_path / "plots" / "pk.png"})

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(json_path.read_text(), parse_constant=reject)  # strict: no NaN
    assert data["diversity"]["DPO t=1"]["reward"] is None
    assert data["diversity"]["DPO t=1"]["cosine_distance"] == 0.25
    assert data["best_of_n"]["gsm8k"]["per_problem"] == list(range(40))
    md = md_path.read_text()
    assert md.startswith("# SPL evaluation report\n")
    assert "- **policy**: runs/spl-2" in md and "- **temperatures**: 1, 1.5" in md
    assert "## Notes\n\n- LLM-judge metrics skipped" in md
    # Runs x metrics table with the union of columns; missing and NaN cells read n/a.
    assert "|  | cosine_distance | distinct_2 | reward | self_bleu |" in md
    assert "| DPO t=1 | 0.25 | 0.5 | n/a | n/a |" in md
    assert "| SPL a/b=2 | 0.375 | 0.625 | n/a | 0.125 |" in md
    assert "### gsm8k" in md and "(40 values; see the JSON)" in md
    assert "| lower | upper | count |" in md
    assert "![pass@k](plots/pk.png)" in md


def test_render_markdown_escapes_cells():
    md = render_markdown({"table": {"a|b": {"x": "line\nbreak"}}})
    assert "| a\\|b | line break |" in md
