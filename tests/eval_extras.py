"""The evaluation extras (requirements-eval.txt) in tests: CI installs them and must run every test
that needs them, so there a missing extra fails; elsewhere such a test skips and says why."""

import importlib
import os
from types import ModuleType

import pytest


def require_extra(module: str) -> ModuleType:
    """Import ``module``, an evaluation extra; fail under CI=true, else skip with the reason."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed: "
                                              "pip install -r requirements-eval.txt")
