"""The dependency-free PNG plots (spl/evaluation/plots.py): files decode, sizes and content."""

import struct
import zlib

import numpy as np
import pytest

from spl.evaluation.metrics import reliability_bins
from spl.evaluation.plots import (
    PALETTE,
    encode_png,
    nice_ticks,
    plot_diversity_quality,
    plot_pass_at_k,
    plot_reliability,
    text_bitmap,
)


def decode_png(data: bytes) -> np.ndarray:
    """A strict decoder for what encode_png writes: signature, CRCs, IHDR, filter-0 RGB rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body), f"bad CRC in {tag}"
        chunks.append((tag, body))
        pos += 12 + length
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def test_encode_png_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(image.astype(np.float32))


def _colors(image: np.ndarray) -> set[tuple[int, int, int]]:
    packed = np.unique(image.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
    return {(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255) for c in packed}


def test_plots_decode_with_right_size_and_series_colors(tmp_path):
    runs = {"SPL": [(0.2, 0.5, "1"), (0.3, 0.45, "2")], "DPO": [(0.2, 0.5, "T=1"), (0.25, 0.3, "")]}
    plot_diversity_quality(tmp_path / "dq.png", runs, "cosine distance", "reward")
    curves = {"DPO": {1: 0.2, 4: 0.5, 16: 0.8}, "SPL": {1: 0.1, 4: 0.45, 16: 0.85}}
    plot_pass_at_k(tmp_path / "pk.png", curves)
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 200)
    plot_reliability(tmp_path / "rel.png", reliability_bins(confidence, rng.uniform(size=200) < confidence))
    for name in ("dq.png", "pk.png", "rel.png"):
        image = decode_png((tmp_path / name).read_bytes())
        assert image.shape == (560, 800, 3)
        colors = _colors(image)
        assert PALETTE[0] in colors and (0, 0, 0) in colors  # a series and the axes are drawn
        assert (image == 255).all(axis=2).mean() > 0.5  # mostly background, not a smear
    assert PALETTE[1] in _colors(decode_png((tmp_path / "pk.png").read_bytes()))


def test_plot_skips_nan_and_handles_degenerate_ranges(tmp_path):
    # One point, and a NaN: limits must still be valid and nothing may crash.
    plot_pass_at_k(tmp_path / "one.png", {"only": {1: float("nan"), 4: 0.5}})
    plot_diversity_quality(tmp_path / "flat.png", {"a": [(0.3, 0.3, "x")]}, "d", "q")
    assert decode_png((tmp_path / "flat.png").read_bytes()).shape == (560, 800, 3)


def test_font_and_ticks():
    bitmap = text_bitmap("Ab1", scale=2)
    assert bitmap.shape == (14, 36) and bitmap.any()
    assert np.array_equal(text_bitmap("a"), text_bitmap("A"))  # upper-case font
    assert np.array_equal(text_bitmap("\u00e9"), text_bitmap("?"))  # unknown glyphs show "?"
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.41) == [0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
