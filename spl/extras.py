"""Optional packages (evaluation extras, logging backends, GGUF import): one rule for importing them.

An extra that is *not installed* is a choice the user made: the metric, figure or backend that
needs it is skipped and the report names the package (``ExtraMissing``). An extra that is installed
but *fails to import* is a broken environment, and reading it as "not installed" would silently
drop a metric (transformers 5.25 once failed to import beside a top-level package of the same name
as one of its dependencies, and the embedding metric vanished from reports): that is an
``ExtraBroken`` error naming the package and the cause, never a skip.

The line between the two is exact: a ``ModuleNotFoundError`` while the extra's own top-level
package cannot be found means not installed; anything else raised while importing it (a missing
dependency of the extra, an ``ImportError`` from inside it, a crash) means broken.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

INSTALL_HINT = "pip install -r requirements-eval.txt"


class ExtraMissing(RuntimeError):
    """An optional package is not installed: the caller skips what needs it and says so."""

    def __init__(self, message: str, package: str = "") -> None:
        super().__init__(message)
        self.package = package  # the top-level import name that is missing


class ExtraBroken(RuntimeError):
    """An optional package is installed but cannot be imported: an error, never a skip."""


def import_extra(module: str, *, needed_for: str, hint: str = INSTALL_HINT) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``), an optional package.

    ``needed_for`` names what is skipped without it ("figures", "embedding cosine distance"); it
    starts both messages. Raises ``ExtraMissing`` when the package itself is absent and
    ``ExtraBroken`` (from the original error) when it is present but its import fails.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if _absent(top):
            raise ExtraMissing(f"{needed_for} skipped: {top} is not installed ({hint})", top) from None
        raise ExtraBroken(_broken(top, needed_for, err)) from err
    except Exception as err:  # ImportError from inside the package, or any error its import raises
        raise ExtraBroken(_broken(top, needed_for, err)) from err


def _absent(top: str) -> bool:
    """Whether the top-level package itself cannot be found (``None`` in sys.modules blocks it)."""
    if top in sys.modules:
        return sys.modules[top] is None
    return importlib.util.find_spec(top) is None


def _broken(top: str, needed_for: str, err: BaseException) -> str:
    return (f"{top} is installed but cannot be imported, so {needed_for} cannot run: "
            f"{type(err).__name__}: {err}. Repair the environment (reinstall {top} and what it needs), "
            f"or uninstall {top} to skip {needed_for}")
