"""Markdown tables and the loss-vs-wall-clock plot of the extension benchmark.

The plot uses matplotlib when it is installed (the GPU machine has it); otherwise a plain line chart drawn with
Pillow (a dependency of the project's stack); with neither, no PNG and a message saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Series", "Panel", "plot_panels", "markdown_table", "fmt", "save_grid"]

COLOURS = {"dense": (0.1, 0.1, 0.1), "radial": (0.12, 0.47, 0.71), "svg2": (0.89, 0.47, 0.1)}


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    colour: tuple[float, float, float] = (0.3, 0.3, 0.3)
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    hlines: list[tuple[str, float]] = field(default_factory=list)  # (label, y): reference levels


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_panels(path: Path, panels: list[Panel], title: str) -> Optional[str]:
    """Write ``panels`` side by side to ``path``; returns the backend used ("matplotlib" / "pillow") or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for s in panel.series:
                ax.plot(s.xs, s.ys, color=s.colour, linestyle="--" if s.dashed else "-", marker=".", label=s.label)
            for i, (label, y) in enumerate(panel.hlines):
                ax.axhline(y, color=(0.5, 0.5, 0.5), linestyle=[":", "-."][i % 2], linewidth=1, label=label)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return "matplotlib"
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    return _pillow(path, panels, title, Image, ImageDraw)


def _pillow(path: Path, panels: list[Panel], title: str, Image, ImageDraw) -> str:  # noqa: N803 (modules)
    pw, ph, margin = 640, 460, 60
    img = Image.new("RGB", (pw * len(panels), ph + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for k, panel in enumerate(panels):
        x0, y0, x1, y1 = k * pw + margin, 40 + 20, (k + 1) * pw - 20, ph - margin + 30
        xs = [x for s in panel.series for x in s.xs if math.isfinite(x)]
        ys = [y for s in panel.series for y in s.ys if math.isfinite(y)] + [y for _, y in panel.hlines if math.isfinite(y)]
        if not xs or not ys:
            continue
        lo_x, hi_x = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1.0
        lo_y, hi_y = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1.0

        def at(x: float, y: float) -> tuple[float, float]:
            return x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (y - lo_y) / (hi_y - lo_y) * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, y0 - 18), panel.title, fill="black")
        draw.text((x0, y1 + 6), f"{panel.xlabel}: {lo_x:.3g} .. {hi_x:.3g}", fill="black")
        draw.text((x0 - margin + 4, y0), f"{hi_y:.4g}", fill="black")
        draw.text((x0 - margin + 4, y1 - 10), f"{lo_y:.4g}", fill="black")
        legend_y = y0 + 4
        for label, y in panel.hlines:
            _, py = at(lo_x, y)
            draw.line((x0, py, x1, py), fill=(128, 128, 128), width=1)
            draw.text((x1 - 200, legend_y), f"--- {label}", fill=(128, 128, 128))
            legend_y += 12
        for s in panel.series:
            rgb = tuple(int(255 * c) for c in s.colour)
            pts = [at(x, y) for x, y in zip(s.xs, s.ys) if math.isfinite(x) and math.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=rgb, width=1 if s.dashed else 2)
            draw.text((x1 - 200, legend_y), ("- - " if s.dashed else "--- ") + s.label, fill=rgb)
            legend_y += 12
    img.save(path)
    return "pillow"


def save_grid(path: Path, rows: list[tuple[str, "np.ndarray"]], scale: int = 2) -> bool:
    """One row of frames per run (uint8 ``[T, H, W, 3]`` each), labelled on the left; False without Pillow."""
    try:
        import numpy as np
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    label_w, gap = 130, 2
    t, h, w, _ = rows[0][1].shape
    t = max(r[1].shape[0] for r in rows)
    img = Image.new("RGB", (label_w + t * (w * scale + gap), len(rows) * (h * scale + gap)), "white")
    draw = ImageDraw.Draw(img)
    for i, (label, frames) in enumerate(rows):
        y = i * (h * scale + gap)
        draw.text((4, y + h * scale // 2 - 6), label, fill="black")
        for j, frame in enumerate(np.asarray(frames)):
            tile = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (label_w + j * (w * scale + gap), y))
    img.save(path)
    return True
