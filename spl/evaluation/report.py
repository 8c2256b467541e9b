"""Evaluation outputs: one JSON with every number, a Markdown report, and JSONL samples.

The results are a nested dict built by the evaluation script, e.g. ``{"meta": {...},
"notes": [...], "diversity": {run: {metric: value}}, "best_of_n": {...}, "calibration": {...}}``.
The JSON is the record (NaN and infinities become null, since JSON has no such numbers); the
Markdown is for reading: a dict of scalars becomes a metric/value table, a dict of such dicts a
runs x metrics table, a list of flat dicts a table, anything deeper a subsection.
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spl.atomic import atomic_write_text

_MAX_INLINE_LIST = 16  # longer lists of numbers (per-prompt values) are left to the JSON


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy values, dataclasses, tuples and Paths turned into plain JSON types.

    Non-finite floats become None: ``json.dump`` would write NaN, which strict parsers reject.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to the results JSON: {obj!r}")


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as indented, strict JSON; returns the path."""
    path = Path(path)
    # Written atomically, like every output here: an interrupted run never leaves half a file.
    atomic_write_text(path, json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    return path


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON object per line (the samples behind the numbers, for inspection or re-scoring)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float, np.integer, np.floating, np.bool_))


def format_value(v: Any) -> str:
    """A table cell: 4 significant digits for floats, "n/a" for missing or non-finite."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    if isinstance(v, Sequence) and not isinstance(v, str):
        return ", ".join(format_value(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(format_value(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # Union of keys in first-seen order, so columns follow the order results were built in.
    return list(dict.fromkeys(k for row in rows for k in row))


def _render(value: Any, level: int) -> list[str]:
    heading = "#" * min(level, 6)  # Markdown has six heading levels; deeper ones share the last
    if _is_scalar(value):
        return [format_value(value), ""]
    if isinstance(value, Mapping):
        # {metric: value} -> a two-column table.
        if all(_is_scalar(v) or _is_short_number_list(v) for v in value.values()):
            return _table(["metric", "value"], list(value.items()))
        # {run: {metric: value}} -> one row per run, one column per metric: the comparison view.
        if all(isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value.values()):
            cols = _columns(list(value.values()))
            return _table(["", *cols], [[name, *(row.get(c) for c in cols)] for name, row in value.items()])
        # Mixed: the scalars in one table, then a subsection per nested value.
        lines = []
        flat = {k: v for k, v in value.items() if _is_scalar(v) or _is_short_number_list(v)}
        if flat:
            lines += _table(["metric", "value"], list(flat.items()))
        for key, sub in value.items():
            if key not in flat:
                lines += [f"{heading} {key}", "", *_render(sub, level + 1)]
        return lines
    if isinstance(value, Sequence):
        # A list of records (reliability bins, per-level results) -> one row per record.
        if value and all(isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value):
            cols = _columns(value)
            return _table(cols, [[row.get(c) for c in cols] for row in value])
        if all(_is_scalar(v) for v in value):
            if len(value) > _MAX_INLINE_LIST:
                return [f"({len(value)} values; see the JSON)", ""]
            return [format_value(list(value)), ""]
        return [line for v in value for line in _render(v, level)]
    return [format_value(value), ""]


def _is_short_number_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) <= _MAX_INLINE_LIST and all(_is_scalar(x) for x in v)


def render_markdown(results: Mapping[str, Any], title: str = "SPL evaluation report",
                    figures: Mapping[str, str] | None = None) -> str:
    """The Markdown report: title, ``meta`` and ``notes`` first, one section per other key,
    then the figures (name -> image path relative to the report)."""
    results = to_jsonable(results)  # numpy values and dataclasses render like plain values
    lines = [f"# {title}", ""]
    meta = results.get("meta")
    if isinstance(meta, Mapping):
        for key, v in meta.items():
            shown = format_value(v) if _is_scalar(v) or isinstance(v, list) else json.dumps(to_jsonable(v))
            lines.append(f"- **{key}**: {shown}")
        lines.append("")
    notes = results.get("notes")
    if notes:
        # Notes say what was skipped and why (no judge endpoint, fallback embeddings, ...).
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for section, value in results.items():
        if section not in ("meta", "notes"):
            lines += [f"## {section}", "", *_render(value, 3)]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({path})\n" for name, path in figures.items()]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Mapping[str, Any], out_dir: str | Path,
                 figures: Mapping[str, str | Path] | None = None,
                 title: str = "SPL evaluation report") -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``out_dir``; returns both paths.

    Figure paths are written relative to ``out_dir`` when they lie inside it, so the folder can
    be moved or viewed on GitHub as a whole.
    """
    out_dir = Path(out_dir)
    relative = {}
    for name, path in (figures or {}).items():
        path = Path(path)
        try:
            relative[name] = str(path.resolve().relative_to(out_dir.resolve()))
        except ValueError:
            relative[name] = str(path)
    json_path = write_json(results, out_dir / "results.json")
    md_path = out_dir / "report.md"
    atomic_write_text(md_path, render_markdown(results, title, relative))
    return json_path, md_path
