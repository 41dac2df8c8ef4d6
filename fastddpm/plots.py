"""Plots drawn with PIL alone (no matplotlib): line charts with axes, round ticks
and a legend (``plot_lines``, e.g. the training loss curve) and the noise
schedules' two panels (``plot_schedule``).  Each PNG is written atomically.

Charts are drawn at ``SUPERSAMPLE`` times their size and downsampled, which
antialiases the lines and the text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .files import save_pil_atomic
from .schedule import NoiseSchedule

__all__ = ["plot_lines", "plot_schedule"]

# matplotlib's tab10
COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
SUPERSAMPLE = 2  # plots are drawn at twice the size and downsampled (antialiasing)


def load_font(px: int):
    """PIL's default font at ``px`` pixels (a fixed-size bitmap font on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) within [lo, hi]."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    i = first
    while i * step <= hi + step * 1e-9:
        ticks.append(float(f"{i * step:.12g}"))  # no 0.30000000000000004
        i += 1
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    s = f"{v:.4g}"
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant}e{int(exp)}"
    return s


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Ticks for a log axis spanning log10 values [lo, hi]: (position, label)."""
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(decades) >= 4:
        stride = max(1, math.ceil(len(decades) / 7))
        return [(float(d), _fmt(10.0 ** d)) for d in decades[::stride]]
    if hi - lo >= 1:  # one to three decades: 1, 2, 5 of each
        values = [m * 10.0 ** d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
        return [(math.log10(v), _fmt(v)) for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
    values = [v for v in _nice_ticks(10.0 ** lo, 10.0 ** hi) if v > 0]
    return [(math.log10(v), _fmt(v)) for v in values]


def _series_arrays(name, value, logy: bool):
    """(xs, ys, valid) float64 arrays of one series."""
    def arr(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
        return np.asarray(v, dtype=np.float64).reshape(-1)

    if isinstance(value, tuple) and len(value) == 2:
        xs, ys = arr(value[0]), arr(value[1])
    else:
        ys = arr(value)
        xs = np.arange(ys.size, dtype=np.float64)
    if xs.size != ys.size:
        raise ValueError(f"series {name!r} has {xs.size} x values and {ys.size} y values")
    valid = np.isfinite(xs) & np.isfinite(ys)
    if logy:
        valid &= ys > 0
        ys = np.log10(np.where(valid, ys, 1.0))
    return xs, ys, valid


def _span(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        d = 0.5 if lo == 0 else abs(lo) * 0.1
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def _render_lines(series: Mapping, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
                  size: tuple[int, int] = (640, 400)):
    """The chart of ``plot_lines`` as an RGB PIL image of ``size``."""
    from PIL import Image, ImageDraw

    k = SUPERSAMPLE
    W, H = int(size[0]) * k, int(size[1]) * k
    if W < 100 * k or H < 80 * k:
        raise ValueError(f"size must be at least (100, 80), got {tuple(size)}")
    data = [(str(name), *_series_arrays(name, value, logy)) for name, value in series.items()]
    xs_all = np.concatenate([xs[v] for _, xs, _, v in data]) if data else np.zeros(0)
    ys_all = np.concatenate([ys[v] for _, _, ys, v in data]) if data else np.zeros(0)
    has_data = xs_all.size > 0
    if has_data:
        x_lo, x_hi = _span(float(xs_all.min()), float(xs_all.max()), 0.0)
        y_lo, y_hi = _span(float(ys_all.min()), float(ys_all.max()), 0.05)
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    x_ticks = [(v, _fmt(v)) for v in _nice_ticks(x_lo, x_hi)]
    y_ticks = _log_ticks(y_lo, y_hi) if logy else [(v, _fmt(v)) for v in _nice_ticks(y_lo, y_hi)]

    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_tick = load_font(14 * k), load_font(12 * k), load_font(11 * k)
    tick_w = max((draw.textlength(s, font=f_tick) for _, s in y_ticks), default=0)
    left = int(tick_w + 12 * k + (18 * k if ylabel else 4 * k))
    top = 30 * k if title else 12 * k
    bottom = 24 * k + (18 * k if xlabel else 0)
    right = 18 * k
    x0, x1, y0, y1 = left, W - right, top, H - bottom  # plot area (y0 top)

    def px(x):
        return x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def py(y):
        return y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0)

    grey, dark = (225, 225, 225), (40, 40, 40)
    for v, s in x_ticks:
        x = px(v)
        draw.line([(x, y0), (x, y1)], fill=grey, width=k)
        draw.line([(x, y1), (x, y1 + 4 * k)], fill=dark, width=k)
        draw.text((x, y1 + 6 * k), s, fill=dark, font=f_tick, anchor="ma")
    for v, s in y_ticks:
        y = py(v)
        draw.line([(x0, y), (x1, y)], fill=grey, width=k)
        draw.line([(x0 - 4 * k, y), (x0, y)], fill=dark, width=k)
        draw.text((x0 - 6 * k, y), s, fill=dark, font=f_tick, anchor="rm")
    # lines go on a transparent layer the size of the plot area, which clips them
    layer = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(layer)
    for i, (_, xs, ys, valid) in enumerate(data):
        color = COLORS[i % len(COLORS)]
        pts_x, pts_y = px(xs) - x0, py(ys) - y0
        # runs of consecutive valid points: an invalid point breaks the line
        edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            pts = list(zip(pts_x[start:stop].tolist(), pts_y[start:stop].tolist()))
            if len(pts) == 1:
                (cx, cy), r = pts[0], 2.5 * k
                ldraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            else:
                ldraw.line(pts, fill=color, width=2 * k, joint="curve")
    img.paste(layer, (x0, y0), layer)
    draw.rectangle([x0, y0, x1, y1], outline=dark, width=k)

    if not has_data:
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no data", fill=(150, 150, 150), font=f_label, anchor="mm")
    names = [name for name, *_ in data]
    if any(names):
        row_h = 16 * k
        box_w = int(max(draw.textlength(s, font=f_tick) for s in names) + 34 * k)
        box_h = row_h * len(names) + 6 * k
        # the corner whose box covers the fewest line pixels (top right on ties)
        alpha = np.asarray(layer.getchannel("A")) > 0
        m = 8 * k
        corners = [(x1 - m - box_w, y0 + m), (x0 + m, y0 + m), (x1 - m - box_w, y1 - m - box_h),
                   (x0 + m, y1 - m - box_h)]
        covered = [int(alpha[by - y0:by - y0 + box_h, bx - x0:bx - x0 + box_w].sum()) for bx, by in corners]
        bx0, by0 = corners[covered.index(min(covered))]
        bx1, by1 = bx0 + box_w, by0 + box_h
        draw.rectangle([bx0, by0, bx1, by1], fill=(255, 255, 255), outline=(180, 180, 180), width=k)
        for i, name in enumerate(names):
            cy = by0 + 3 * k + row_h * i + row_h / 2
            draw.line([(bx0 + 6 * k, cy), (bx0 + 24 * k, cy)], fill=COLORS[i % len(COLORS)], width=2 * k)
            draw.text((bx0 + 29 * k, cy), name, fill=dark, font=f_tick, anchor="lm")
    if title:
        draw.text((W / 2, 8 * k), title, fill=(0, 0, 0), font=f_title, anchor="ma")
    if xlabel:
        draw.text(((x0 + x1) / 2, H - 6 * k), xlabel, fill=dark, font=f_label, anchor="md")
    if ylabel:
        tw = int(draw.textlength(ylabel, font=f_label)) + 4 * k
        label = Image.new("L", (tw, 16 * k), 0)
        ImageDraw.Draw(label).text((tw / 2, 8 * k), ylabel, fill=255, font=f_label, anchor="mm")
        label = label.rotate(90, expand=True)
        ly = int((y0 + y1) / 2 - label.height / 2)
        img.paste(Image.new("RGB", label.size, dark), (2 * k, max(0, ly)), label)
    return img.resize((W // k, H // k), Image.Resampling.LANCZOS)


def plot_lines(series: Mapping, path, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
               size: tuple[int, int] = (640, 400)) -> Path:
    """A line chart as a PNG: axes, grid, tick labels, legend.

    :param series: ``{name: (xs, ys)}`` (or ``{name: ys}``, x = 0, 1, ...);
        lists, numpy arrays or tensors.  Non-finite points (and, with
        ``logy``, points <= 0) are skipped and break the line.
    :param logy: logarithmic y axis.
    :param size: ``(width, height)`` in pixels.
    """
    return save_pil_atomic(_render_lines(series, title, xlabel, ylabel, logy, size), path, "PNG")


def plot_schedule(schedules, path, size: tuple[int, int] = (480, 360)) -> Path:
    """Two panels side by side in one PNG: ``betas`` (log scale) and
    ``alphas_cumprod`` against the timestep ``t``.

    :param schedules: a ``NoiseSchedule``, or ``{name: NoiseSchedule}`` to compare.
        A respaced schedule is drawn at its original timesteps.
    :param size: ``(width, height)`` of each panel.
    """
    from PIL import Image

    if isinstance(schedules, NoiseSchedule):
        schedules = {schedules.kind: schedules}
    if not isinstance(schedules, Mapping) or not schedules:
        raise ValueError("schedules must be a NoiseSchedule or a non-empty {name: NoiseSchedule} dict")
    for name, s in schedules.items():
        if not isinstance(s, NoiseSchedule):
            raise TypeError(f"schedules[{name!r}] must be a NoiseSchedule, got {type(s).__name__}")
    betas = {n: (np.asarray(s.timesteps), s.betas) for n, s in schedules.items()}
    alphas_cumprod = {n: (np.asarray(s.timesteps), s.alphas_cumprod64) for n, s in schedules.items()}
    left = _render_lines(betas, "betas", "t", "beta_t", logy=True, size=size)
    right = _render_lines(alphas_cumprod, "alphas_cumprod", "t", "abar_t", size=size)
    img = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    img.paste(left, (0, 0))
    img.paste(right, (left.width, 0))
    return save_pil_atomic(img, path, "PNG")
