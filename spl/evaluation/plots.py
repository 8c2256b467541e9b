"""The report's figures as PNG files, with no plotting library (paper Fig. 2-5 style).

Three plots: diversity against quality with one point per temperature or alpha/beta (§4.1,
Fig. 2), best-of-N pass@k curves (§4.2, Fig. 3) and reliability diagrams (§4.3, Fig. 4).
matplotlib is not a run-time dependency, so this file rasterizes onto a numpy RGB canvas (lines
stamped along their length, disk markers, a 5x7 bitmap font) and writes the PNG with zlib and
struct. Text is upper-case only: the font has no lower-case glyphs, to keep it small.
"""

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# 5x7 glyphs: each is 7 rows of 5 pixels, a row stored as two hex digits (bit 4 = leftmost).
_GLYPH_TABLE = """
0=0E1113151911 0E|1=040C0404040E 0E|2=0E1101020408 1F|3=1F0204020111 0E|4=02060A121F02 02
5=1F101E010111 0E|6=0608101E1111 0E|7=1F0102040808 08|8=0E11110E1111 0E|9=0E11110F0102 0C
A=0E11111F1111 11|B=1E11111E1111 1E|C=0E1110101011 0E|D=1C1211111112 1C|E=1F10101E1010 1F
F=1F10101E1010 10|G=0E1110171111 0F|H=1111111F1111 11|I=0E0404040404 0E|J=070202020212 0C
K=111214181412 11|L=101010101010 1F|M=111B15151111 11|N=111119151311 11|O=0E1111111111 0E
P=1E11111E1010 10|Q=0E1111111512 0D|R=1E11111E1412 11|S=0F10100E0101 1E|T=1F0404040404 04
U=111111111111 0E|V=11111111110A 04|W=111111151515 0A|X=11110A040A11 11|Y=1111110A0404 04
Z=1F0102040810 1F| =000000000000 00|.=00000000000C 0C|,=000000000C04 08|-=0000001F0000 00
+=0004041F0404 00|/=000102040810 00|==00001F001F 0000|(=020408080804 02|)=080402020204 08
:=000C0C000C0C 00|%=181902040813 03|@=0E1117151710 0F|_=000000000000 1F|'=040408000000 00
*=0004150E1504 00|<=020408100804 02|>=080402010204 08|[=0E0808080808 0E|]=0E0202020202 0E
?=0E1101020400 04|!=040404040400 04|#=0A0A1F0A1F0A 0A|^=040A11000000 00|&=0C1214081512 0D
"""
_FONT: dict[str, np.ndarray] = {}
for _entry in _GLYPH_TABLE.replace("\n", "|").split("|"):
    if len(_entry) >= 3:
        _hex = _entry[2:].replace(" ", "")
        _rows = [int(_hex[i:i + 2], 16) for i in range(0, 14, 2)]
        _FONT[_entry[0]] = np.array([[(r >> (4 - c)) & 1 for c in range(5)] for r in _rows], dtype=bool)

# Matplotlib's tab10 colors: distinguishable, and familiar to readers of ML papers.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image: 8-bit RGB, no interlace, filter 0 on every row."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"need an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    # Each scanline starts with its filter-type byte (0 = none).
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # depth 8, color type 2 (RGB)
    idat = zlib.compress(raw, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Canvas:
    """An RGB raster with the few drawing primitives the plots need; (x, y) with y downwards."""

    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)  # (H, W, 3) white
        self.clip = (0, 0, width - 1, height - 1)  # x0, y0, x1, y1 (inclusive)

    def _stamp(self, xs: np.ndarray, ys: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
        """Paint ``mask`` (h, w bool) centred at every (xs[i], ys[i]), inside the clip rectangle."""
        # All (point, mask pixel) pairs at once: (n_points, n_mask_pixels) index grids, flattened.
        dy, dx = np.nonzero(mask)
        px = (np.round(xs)[:, None] + dx[None, :] - mask.shape[1] // 2).astype(int).ravel()
        py = (np.round(ys)[:, None] + dy[None, :] - mask.shape[0] // 2).astype(int).ravel()
        x0, y0, x1, y1 = self.clip
        keep = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
        self.pixels[py[keep], px[keep]] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int],
             width: int = 1) -> None:
        # Stamp a width x width square every half pixel along the segment: no gaps at any slope.
        steps = int(math.ceil(2 * max(abs(x1 - x0), abs(y1 - y0)))) + 1
        t = np.linspace(0.0, 1.0, steps)
        self._stamp(x0 + t * (x1 - x0), y0 + t * (y1 - y0), np.ones((width, width), bool), color)

    def disk(self, x: float, y: float, radius: int, color: tuple[int, int, int]) -> None:
        r = np.arange(-radius, radius + 1)
        mask = r[None, :] ** 2 + r[:, None] ** 2 <= radius**2 + radius  # +radius rounds the edge
        self._stamp(np.array([x]), np.array([y]), mask, color)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        """Fill the axis-aligned rectangle between two corners (clipped)."""
        cx0, cy0, cx1, cy1 = self.clip
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        xa, ya, xb, yb = max(xa, cx0), max(ya, cy0), min(xb, cx1), min(yb, cy1)
        if xa <= xb and ya <= yb:
            self.pixels[ya:yb + 1, xa:xb + 1] = color

    def text(self, x: float, y: float, s: str, color: tuple[int, int, int] = BLACK, scale: int = 2,
             anchor: str = "left", vertical: bool = False) -> None:
        """Draw ``s`` with its left/centre/right edge at x and its vertical centre at y.

        ``vertical`` rotates it a quarter turn counter-clockwise (for y-axis labels).
        """
        bitmap = text_bitmap(s, scale)  # (h, w)
        if vertical:
            bitmap = np.rot90(bitmap)
        h, w = bitmap.shape
        shift = {"left": 0, "center": w // 2, "right": w}[anchor] if not vertical else w // 2
        top, left = int(round(y - h / 2)), int(round(x - shift))
        ys, xs = np.nonzero(bitmap)
        # Text clips to the whole image, not to self.clip: tick labels live outside the plot area.
        x0, y0, x1, y1 = 0, 0, self.pixels.shape[1] - 1, self.pixels.shape[0] - 1
        xs, ys = xs + left, ys + top
        keep = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        self.pixels[ys[keep], xs[keep]] = color

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(encode_png(self.pixels))


def text_bitmap(s: str, scale: int = 2) -> np.ndarray:
    """(7*scale, 6*scale*len) bool bitmap of ``s`` (upper-cased; unknown characters as "?")."""
    glyphs = [_FONT.get(ch, _FONT["?"]) for ch in s.upper()]
    # One blank column after each glyph separates letters.
    spaced = [np.pad(g, ((0, 0), (0, 1))) for g in glyphs] or [np.zeros((7, 1), bool)]
    # kron with a block of ones is a nearest-neighbour upscale: crisp pixels at any scale.
    return np.kron(np.concatenate(spaced, axis=1), np.ones((scale, scale), bool)).astype(bool)


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / target  # the step that would give exactly `target` intervals
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    # round() strips float debris such as 0.30000000000000004 from the labels.
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _format_tick(v: float) -> str:
    return f"{v:.4g}"


@dataclass
class Series:
    """One named set of points; ``labels`` annotate single points (e.g. "T=1.5")."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    labels: Sequence[str] | None = None
    connect: bool = True


def _finite(s: Series) -> list[tuple[float, float, str]]:
    """The (x, y, label) points of a series with both coordinates finite."""
    labels = s.labels if s.labels is not None else [""] * len(s.x)
    return [(x, y, label) for x, y, label in zip(s.x, s.y, labels, strict=True)
            if math.isfinite(x) and math.isfinite(y)]


def plot_xy(path: str | Path, series: Sequence[Series], title: str = "", xlabel: str = "",
            ylabel: str = "", log2_x: bool = False, xlim: tuple[float, float] | None = None,
            ylim: tuple[float, float] | None = None, diagonal: bool = False,
            bars: Sequence[tuple[float, float, float]] = (), legend: str = "upper right",
            width: int = 800, height: int = 560) -> None:
    """A line/scatter plot with axes, grid, ticks, legend and optional bars and y = x diagonal.

    ``bars`` are (x_left, x_right, height) rectangles drawn under the series (reliability
    diagrams). With ``log2_x`` the x axis is log2-spaced and ticked at powers of two (pass@k).
    ``legend`` is "upper right", "lower right", "upper left" or "lower left". NaN points are
    skipped.
    """
    canvas = Canvas(width, height)
    # The plot rectangle; the margins hold tick labels (left, bottom), the title and axis labels.
    left, right, top, bottom = 90, width - 20, 50, height - 70
    fx = (lambda v: math.log2(v)) if log2_x else (lambda v: v)
    points = [(fx(x), y) for s in series for x, y, _ in _finite(s)]
    xs = [p[0] for p in points] + [fx(b[0]) for b in bars] + [fx(b[1]) for b in bars]
    ys = [p[1] for p in points] + [b[2] for b in bars]
    x_lo, x_hi = (fx(xlim[0]), fx(xlim[1])) if xlim else (min(xs, default=0.0), max(xs, default=1.0))
    y_lo, y_hi = ylim if ylim else (min(ys, default=0.0), max(ys, default=1.0))
    if not xlim:
        pad = 0.05 * ((x_hi - x_lo) or 1.0)  # keep markers off the frame
        x_lo, x_hi = x_lo - pad, x_hi + pad
    if not ylim:
        pad = 0.08 * ((y_hi - y_lo) or 1.0)
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

    # Ticks and grid. A log2 axis is ticked at whole powers of two (1, 2, 4, ... 128).
    if log2_x:
        x_ticks = [float(e) for e in range(math.ceil(x_lo), math.floor(x_hi) + 1)]
        x_names = [str(2 ** int(e)) for e in x_ticks]
    else:
        x_ticks = [t for t in nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi]
        x_names = [_format_tick(t) for t in x_ticks]
    y_ticks = [t for t in nice_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
    for t, name in zip(x_ticks, x_names, strict=True):
        canvas.line(px(t), top, px(t), bottom, GRID)
        canvas.line(px(t), bottom, px(t), bottom + 5, BLACK)
        canvas.text(px(t), bottom + 18, name, anchor="center")
    for t in y_ticks:
        canvas.line(left, py(t), right, py(t), GRID)
        canvas.line(left - 5, py(t), left, py(t), BLACK)
        canvas.text(left - 9, py(t), _format_tick(t), anchor="right")

    # Data, clipped to the plot rectangle.
    canvas.clip = (left + 1, top, right, bottom - 1)
    for x0, x1, h in bars:
        # Bars stand on y = 0 (or the axis bottom) and leave a 1-pixel gap to their neighbours.
        canvas.rect(px(fx(x0)) + 1, py(h), px(fx(x1)) - 1, py(max(y_lo, 0.0)), (158, 202, 225))
    if diagonal:
        lo, hi = max(x_lo, y_lo), min(x_hi, y_hi)
        canvas.line(px(lo), py(lo), px(hi), py(hi), (120, 120, 120), width=2)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = [(px(fx(x)), py(y)) for x, y, _ in _finite(s)]
        if s.connect:
            for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
                canvas.line(ax, ay, bx, by, color, width=2)
        for x, y in pts:
            canvas.disk(x, y, 4, color)
    # Point labels may stick out of the plot rectangle a little; that is better than cutting them.
    canvas.clip = (0, 0, width - 1, height - 1)
    for i, s in enumerate(series):
        for x, y, label in _finite(s):
            if label:
                canvas.text(px(fx(x)) + 7, py(y) - 9, label, PALETTE[i % len(PALETTE)], scale=1)

    # Frame, titles, legend.
    for a, b, c, d in ((left, top, right, top), (left, bottom, right, bottom),
                       (left, top, left, bottom), (right, top, right, bottom)):
        canvas.line(a, b, c, d, BLACK)
    canvas.text((left + right) / 2, 22, title, anchor="center")
    canvas.text((left + right) / 2, height - 22, xlabel, anchor="center")
    canvas.text(22, (top + bottom) / 2, ylabel, vertical=True)
    # Legend: only named series (the reliability diagram's dots need none).
    named = [s for s in series if s.name]
    if named:
        box_w, box_h = 40 + 12 * max(len(s.name) for s in named), 8 + 22 * len(named)
        x0 = right - box_w - 8 if legend.endswith("right") else left + 8
        y0 = top + 8 if legend.startswith("upper") else bottom - box_h - 8
        canvas.rect(x0 - 1, y0 - 1, x0 + box_w + 1, y0 + box_h + 1, (160, 160, 160))  # thin border
        canvas.rect(x0, y0, x0 + box_w, y0 + box_h, WHITE)
        for i, s in enumerate(named):
            color = PALETTE[series.index(s) % len(PALETTE)]
            canvas.rect(x0 + 8, y0 + 10 + 22 * i, x0 + 24, y0 + 22 + 22 * i, color)
            canvas.text(x0 + 32, y0 + 16 + 22 * i, s.name)
    canvas.save(path)


def plot_diversity_quality(path: str | Path, runs: dict[str, Sequence[tuple[float, float, str]]],
                           diversity_name: str, quality_name: str,
                           title: str = "Diversity vs quality") -> None:
    """Fig. 2 style: per method, its (diversity, quality, label) points joined in sweep order."""
    series = [Series(name, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
              for name, pts in runs.items()]
    plot_xy(path, series, title=title, xlabel=diversity_name, ylabel=quality_name)


def plot_pass_at_k(path: str | Path, curves: dict[str, dict[int, float]], title: str = "Best-of-N") -> None:
    """Fig. 3 style: pass@k against k (log2 axis), one curve per model or temperature."""
    series = [Series(name, sorted(c), [c[k] for k in sorted(c)]) for name, c in curves.items()]
    # Curves rise to the upper right, so the legend goes below them.
    plot_xy(path, series, title=title, xlabel="k (samples)", ylabel="pass@k", log2_x=True, ylim=(0.0, 1.0),
            legend="lower right")


def plot_reliability(path: str | Path, bins: Sequence[dict], title: str = "Reliability") -> None:
    """Reliability diagram: per-bin accuracy bars, mean confidence dots, and the y = x line.

    ``bins`` as returned by ``metrics.reliability_bins``; empty bins draw nothing.
    """
    bars = [(b["lower"], b["upper"], b["accuracy"]) for b in bins if b["count"]]
    dots = Series("", [b["confidence"] for b in bins if b["count"]],
                  [b["accuracy"] for b in bins if b["count"]], connect=False)
    plot_xy(path, [dots], title=title, xlabel="confidence", ylabel="accuracy", xlim=(0.0, 1.0),
            ylim=(0.0, 1.0), diagonal=True, bars=bars)
