"""What ``python -m aff_jax.explain`` writes: per image the input, the Grad-CAM overlay and one
map per fusion module of its mean gate, ``summary.png`` (histograms of the gate values per
fusion module) and ``index.html`` showing them all.

Images are drawn with pillow, scaled up (nearest neighbour) to at least ``DISPLAY_SIZE`` pixels
so that 32x32 inputs stay visible; figures use a bare matplotlib ``Figure`` (no pyplot).
"""
from __future__ import annotations

import dataclasses
import html
import pathlib
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

SUMMARY_FILE = 'summary.png'
INDEX_FILE = 'index.html'
DISPLAY_SIZE = 128
_CAM_ALPHA = 0.5


@dataclasses.dataclass(frozen=True)
class Shown:
    """One image of the report: ``pixels`` (H, W, 3) float in [0, 1], its ``label`` and
    ``predicted`` class names, the Grad-CAM ``cam`` (H, W) in [0, 1], ``gates`` {fusion module
    path: (h, w) mean gate over channels, in [0, 1]} and, where the dataset records one, the
    target's ``box`` (ymin, xmin, ymax, xmax), inclusive pixels."""
    pixels: np.ndarray
    label: str
    predicted: str
    cam: np.ndarray
    gates: dict[str, np.ndarray]
    box: np.ndarray | None = None


def _scale(height: int) -> int:
    return max(1, -(-DISPLAY_SIZE // height))


def _upscale(rgb: np.ndarray, scale: int) -> Image.Image:
    """(H, W, 3) float in [0, 1] -> a pillow image ``scale`` times larger (nearest)."""
    image = Image.fromarray(np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _coloured(values: np.ndarray, cmap: str) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) RGB in [0, 1] through the colormap ``cmap``."""
    return colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3]


def _resize_to(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A coarse (h, w) map repeated to (height, width) (nearest), the way each gate value
    covers its receptive-field cell."""
    rows = np.arange(height) * values.shape[0] // height
    cols = np.arange(width) * values.shape[1] // width
    return values[rows][:, cols]


def write_image(shown: Shown, index: int, out: pathlib.Path) -> dict[str, str]:
    """The PNGs of one image in ``out``: ``{'input': file, 'gradcam': file, <module>: file}``."""
    height, width = shown.pixels.shape[:2]
    scale = _scale(height)
    files = {'input': f'image_{index:03d}_input.png', 'gradcam': f'image_{index:03d}_gradcam.png'}
    _upscale(shown.pixels, scale).save(out / files['input'])
    overlay = _upscale((1 - _CAM_ALPHA) * shown.pixels
                       + _CAM_ALPHA * _coloured(shown.cam, 'jet'), scale)
    draw = ImageDraw.Draw(overlay)
    if shown.box is not None:
        y0, x0, y1, x1 = (int(v) for v in shown.box)
        draw.rectangle((x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1),
                       outline=(255, 255, 255))
    row, col = np.unravel_index(np.argmax(shown.cam), shown.cam.shape)
    centre = ((col + 0.5) * scale, (row + 0.5) * scale)
    draw.ellipse((centre[0] - 3, centre[1] - 3, centre[0] + 3, centre[1] + 3),
                 outline=(0, 0, 0), fill=(255, 255, 255))
    overlay.save(out / files['gradcam'])
    for k, (module, gate) in enumerate(shown.gates.items()):
        files[module] = f'image_{index:03d}_gate_{k}.png'
        _upscale(_coloured(_resize_to(gate, height, width), 'viridis'), scale).save(
            out / files[module])
    return files


def write_summary(gate_values: dict[str, np.ndarray], path: pathlib.Path, title: str) -> None:
    """Histograms of the gate values (all images, positions and channels) of each fusion
    module, one panel each; a note where the model has no gates."""
    count = max(1, len(gate_values))
    fig = Figure(figsize=(3.2 * count, 3.0))
    axes = np.atleast_1d(fig.subplots(1, count))
    if not gate_values:
        axes[0].axis('off')
        axes[0].text(0.5, 0.5, 'no gated fusion in this model', ha='center', va='center')
    for ax, (module, values) in zip(axes, gate_values.items()):
        ax.hist(np.ravel(values), bins=50, range=(0.0, 1.0), color='tab:blue')
        ax.set_title(f'{module}\nmean {np.mean(values):.3f}', fontsize=8)
        ax.set_xlabel('gate M (1: all X, 0: all Y)', fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_index(out: pathlib.Path, title: str, facts: Sequence[str], modules: Sequence[str],
                rows: Sequence[tuple[Shown, dict[str, str]]]) -> pathlib.Path:
    """``index.html``: the facts, ``summary.png`` and one table row per image."""
    head = ''.join(f'<th>{html.escape(m)}</th>' for m in modules)
    body = []
    for shown, files in rows:
        cells = ''.join(f'<td><img src="{files[m]}"></td>' for m in modules)
        caption = f'label {html.escape(shown.label)}<br>predicted {html.escape(shown.predicted)}'
        body.append(f'<tr><td>{caption}</td><td><img src="{files["input"]}"></td>'
                    f'<td><img src="{files["gradcam"]}"></td>{cells}</tr>')
    items = ''.join(f'<li>{html.escape(fact)}</li>' for fact in facts)
    page = f'''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px;text-align:center;font-size:small}}
img{{image-rendering:pixelated}}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{items}</ul>
<p>Grad-CAM: jet colours, red = most evidence for the explained class; the white dot marks its
peak, the white box the target glyph where the dataset records it. Gate columns: the mean over
channels of each fusion module's gate M (viridis, yellow = 1: the fusion takes X, purple = 0:
it takes Y, in the host's roles of X and Y).</p>
<p><img src="{SUMMARY_FILE}"></p>
<table><tr><th></th><th>input</th><th>Grad-CAM</th>{head}</tr>
{''.join(body)}
</table></body></html>
'''
    path = out / INDEX_FILE
    path.write_text(page)
    return path
