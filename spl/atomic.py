"""Atomic writes: write beside the target, flush to disk, then rename (atomic within one filesystem).

Readers see the old file (or directory) or the new one, never a torn or half-written one: weights,
adapters, trainer state, reports. ``fsync_path`` makes a rename durable across a power loss.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's entries: a rename in it becomes durable).
    Without it a power loss right after a rename can leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old content or the new, never a torn file."""
    with _atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically; tensors may live on any device."""
    # safetensors wants contiguous CPU tensors that do not share storage with one another.
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with _atomic_file(path) as tmp:
        save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})})


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``out_dir`` when the block succeeds.

    A directory cannot be renamed over a non-empty one, so an existing ``out_dir`` is first renamed
    aside, then deleted: there is a moment with no ``out_dir``, but never a half-written one. Files
    already in ``out_dir`` are not carried over. On failure the temporary directory is removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0o700)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto the empty directory mkdtemp just made
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
