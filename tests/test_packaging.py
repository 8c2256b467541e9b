"""Our import names are ours alone, and pyproject.toml ships exactly them.

A top-level package is shared with the whole environment: when transformers 5.25 began to depend on
Hugging Face's package ``kernels``, this repo's old top-level ``kernels/`` (the Triton kernels, now
``spl_kernels/``) shadowed it in every process started at the repo root, and ``import transformers``
died there. These tests run where users and CI run (the repo root first on ``sys.path``).
"""

import importlib.metadata
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
OURS = ("spl", "spl_kernels")  # the top-level import names this project ships


def _our_modules() -> list[str]:
    """Every module of our packages, found on disk (so a new module is covered without listing it)."""
    names = []
    for top in OURS:
        names.append(top)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / top)], prefix=f"{top}.")]
    return sorted(names)


def test_top_level_packages_are_exactly_ours():
    """Every folder at the repo root with an ``__init__.py`` is one of OURS: a new one must be added
    here, to pyproject.toml, and checked for a collision."""
    found = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    assert found == sorted(OURS)


@pytest.mark.parametrize("name", OURS)
def test_no_installed_distribution_provides_our_names(name):
    """No distribution in this environment (other than an install of this project) has a top-level
    package of the same name: such a package would shadow it, or it us."""
    owners = set(importlib.metadata.packages_distributions().get(name, [])) - {"spl"}
    assert not owners, f"import name {name!r} is also provided by {sorted(owners)}"


@pytest.mark.parametrize("transformers_first", [True, False], ids=["transformers-first", "spl-first"])
def test_transformers_and_all_of_spl_import_together_from_the_repo_root(transformers_first):
    """One process at the repo root imports transformers (with Hugging Face's ``kernels``
    installed: transformers >= 5.25 needs it) and every module of ours, in either order."""
    pytest.importorskip("transformers", reason="transformers is a test-only oracle (requirements-test.txt)")
    ours = "\n".join(f"import {m}" for m in _our_modules())
    theirs = "import transformers\nfrom transformers import AutoModelForCausalLM, LlamaConfig"
    code = "\n".join([theirs, ours] if transformers_first else [ours, theirs])
    code += "\nimport sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {'spl', 'spl_kernels'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'spl'" in out.stdout


def test_pyproject_declares_exactly_the_packages_it_ships(tmp_path):
    """The wheel pip builds from pyproject.toml holds our packages, every module of them, and
    nothing else at the top level."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in declared} == set(OURS)
    subdirs = sorted({m.rsplit(".", 1)[0] for m in _our_modules() if "." in m} | set(OURS))
    packages = sorted(p for p in subdirs if (ROOT / p.replace(".", "/") / "__init__.py").is_file())
    assert sorted(declared) == packages, "pyproject.toml's packages must list every package folder"
    pytest.importorskip("setuptools", reason="setuptools builds the wheel (requirements-test.txt)")
    # Build from a copy of the tree: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp_path / "src"
    for top in OURS:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--quiet", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("spl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(OURS), f"the wheel ships {sorted(tops)}"
    shipped = {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in names
               if n.endswith(".py")}
    assert shipped == set(_our_modules())
