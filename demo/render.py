"""Pictures and charts of the algorithm's data. Pure functions: arrays in, arrays/figures out.

Conventions: images are (H, W, 3) uint8 RGB; masks (H, W) bool; maps (H, W) float; points
are (x = column, y = row) in pixels of the image they are drawn on. Nothing here runs a
model or recomputes the algorithm: every number shown comes from ``ovdiff_core`` results.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from matplotlib import colormaps
from PIL import Image

from ovdiff_core.geometry import cell_edges
from ovdiff_core.types import Category, PrototypeBank, PrototypeKind, SupportSet

if TYPE_CHECKING:
    from ovdiff_core.prefilter import PrefilterResult

__all__ = [
    "BACKGROUND_COLOR",
    "class_color",
    "class_colors",
    "colorize",
    "empty_scores_figure",
    "esc",
    "highlight_region",
    "legend_html",
    "mark_point",
    "mask_view",
    "md",
    "overlay_labels",
    "part_clusters",
    "prototype_scatter",
    "scores_figure",
    "similarity_overlay",
    "support_tile",
    "upscale",
]

# Distinct colours for classes 1..20 (then they repeat); background is dark grey.
_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 255, 255),
    ],
    dtype=np.uint8,
)  # fmt: skip
BACKGROUND_COLOR = (40, 40, 40)
FOREGROUND_MASK_COLOR = (60, 220, 90)
BACKGROUND_MASK_COLOR = (40, 110, 255)
_MAGMA = (colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
KIND_SYMBOLS = {
    PrototypeKind.CLASS: "star",
    PrototypeKind.INSTANCE: "square",
    PrototypeKind.PART: "circle",
}


def esc(text: object) -> str:
    """``text`` made safe to put inside HTML, as text or as a quoted attribute value.

    The one place where the app escapes: every user- or data-derived string (category
    names, file names, error messages that echo them, settings) passes through here
    before it becomes part of an HTML string, a ``gr.HTML``/``gr.Markdown`` value or a
    pop-up message (Gradio renders those as HTML too).
    """
    return html.escape(str(text), quote=True)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$])")


def md(text: object) -> str:
    """``text`` as literal text inside Markdown that Gradio renders (which allows HTML).

    Markdown punctuation (``*``, ``_``, ``[``, ``#``, backquotes, ``$`` for LaTeX...) is
    backslash-escaped so a name cannot change the layout, then :func:`esc` makes it
    inert as HTML. Not for use inside code spans or fences (those show backslashes).
    """
    return esc(_MARKDOWN_SPECIAL.sub(r"\\\1", str(text)))


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of label ``label`` (0 = background, i >= 1 = i-th class)."""
    if label <= 0:
        return BACKGROUND_COLOR
    r, g, b = _PALETTE[(label - 1) % len(_PALETTE)]
    return int(r), int(g), int(b)


def class_colors(n_labels: int) -> np.ndarray:
    """(n_labels, 3) uint8 colours of labels 0..n_labels - 1."""
    return np.array([class_color(i) for i in range(n_labels)], dtype=np.uint8)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the short side is >= ``min_side``.

    Keeps tiny support images (e.g. 64x64 from the test models) crisp on screen.
    """
    factor = int(np.ceil(min_side / max(1, min(image.shape[:2]))))
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize (H, W[, 3]) uint8 to ``size`` = (H', W')."""
    if image.shape[:2] == size:
        return image
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), method))


_RESIZED: list[tuple[np.ndarray, tuple[int, int], np.ndarray]] = []  # small LRU, newest last
_RESIZED_LOCK = threading.Lock()


def _cached_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`_resize`, remembering the last few results by identity of ``image``.

    Every click on the same segmentation previews the same image; this saves a resize.
    """
    with _RESIZED_LOCK:
        for i, (src, sz, out) in enumerate(_RESIZED):
            if src is image and sz == size:
                _RESIZED.append(_RESIZED.pop(i))
                return out
    out = _resize(image, size)
    with _RESIZED_LOCK:
        _RESIZED.append((image, size, out))
        del _RESIZED[:-8]
    return out


def _blend(base: np.ndarray, color: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    out = base.astype(np.float32) * (1.0 - a) + color.astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean or label map (where a 4-neighbour differs)."""
    e = np.zeros(mask.shape, dtype=bool)
    e[:-1, :] |= mask[:-1, :] != mask[1:, :]
    e[1:, :] |= mask[1:, :] != mask[:-1, :]
    e[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    e[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    return e


def colorize(values: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map (H, W) floats to (H, W, 3) uint8 with the perceptually uniform 'magma' colormap.

    Values are clipped to [vmin, vmax]; NaN shows as the lowest colour.
    """
    span = max(vmax - vmin, 1e-12)
    v = np.nan_to_num((np.asarray(values, dtype=np.float32) - vmin) / span, nan=0.0)
    return _MAGMA[np.clip((v * 255).astype(np.int32), 0, 255)]


def overlay_labels(
    image: np.ndarray, labels: np.ndarray, alpha: float = 0.55, edges: bool = True
) -> np.ndarray:
    """Tint every pixel with its label's colour (background darkened, classes coloured).

    Args:
        image: (H, W, 3) uint8.
        labels: (H, W) int, 0 = background, i = class i (see :func:`class_color`).
        alpha: opacity of the class colours (background uses ``alpha / 2``).
        edges: draw label boundaries in white.

    Returns:
        (H, W, 3) uint8.
    """
    n = int(labels.max()) + 1 if labels.size else 1
    colors = class_colors(n)[labels]
    a = np.where(labels > 0, alpha, alpha / 2).astype(np.float32)
    out = _blend(image, colors, a)
    if edges:
        out[_edges(labels)] = 255
    return out


def mark_point(
    image: np.ndarray, x: int, y: int, color: Sequence[int] = (255, 255, 255)
) -> np.ndarray:
    """Copy of ``image`` with a crosshair and ring at pixel (x, y) (x = column, y = row)."""
    out = image.copy()
    h, w = out.shape[:2]
    r = max(4, min(h, w) // 40)
    t = max(1, r // 4)
    ys, xs = np.ogrid[:h, :w]
    d2 = (ys - y) ** 2 + (xs - x) ** 2
    ring = (d2 <= (r + t) ** 2) & (d2 >= (r - t) ** 2)
    out[ring] = 0
    ring_in = (d2 <= (r + t // 2) ** 2) & (d2 >= (r - t // 2 - 1) ** 2)
    out[ring_in] = np.asarray(color, dtype=np.uint8)
    arm = (np.abs(ys - y) < t) & (np.abs(xs - x) > r + t) & (np.abs(xs - x) < 2 * r + t)
    arm |= (np.abs(xs - x) < t) & (np.abs(ys - y) > r + t) & (np.abs(ys - y) < 2 * r + t)
    out[arm] = np.asarray(color, dtype=np.uint8)
    return out


def similarity_overlay(
    image: np.ndarray,
    similarity: np.ndarray,
    alpha: float = 0.6,
    point: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """A prototype's cosine map over the image: 'magma' heatmap blended on top.

    Args:
        image: (H, W, 3) uint8.
        similarity: (H, W) cosine in [-1, 1]; shown clipped to [0, 1].
        point: (x, y) pixel of ``image`` to mark, or None.
        max_side: draw at most this many pixels on the long side (a cheap preview).

    Returns:
        (H', W', 3) uint8 with H' = H and W' = W unless ``max_side`` made it smaller.
    """
    h, w = image.shape[:2]
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = _cached_resize(image, size)
        sim_img = Image.fromarray(np.asarray(similarity, dtype=np.float32), mode="F")
        similarity = np.asarray(sim_img.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    out = _blend(image, colorize(similarity, 0.0, 1.0), alpha)
    if point is not None:
        px = min(int(point[0] * scale), out.shape[1] - 1)
        py = min(int(point[1] * scale), out.shape[0] - 1)
        out = mark_point(out, px, py)
    return out


def mask_view(image: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Foreground green, background blue, the undecided rest greyed; foreground outlined.

    Args:
        image: (H, W, 3) uint8.
        foreground, background: (H, W) bool masks.
    """
    out = _blend(image, np.full_like(image, 128), 0.6)
    out[foreground] = _blend(image[foreground][None], np.array(FOREGROUND_MASK_COLOR), 0.5)[0]
    out[background] = _blend(image[background][None], np.array(BACKGROUND_MASK_COLOR), 0.5)[0]
    out[_edges(foreground)] = 255
    return out


def support_tile(
    image: np.ndarray,
    attribution: np.ndarray,
    foreground: np.ndarray,
    background: np.ndarray,
    min_side: int = 160,
) -> np.ndarray:
    """Four panels in a square: photo | attribution heatmap / masks | foreground only.

    Args:
        image: (H, W, 3) uint8 support image.
        attribution: (H, W) float in [0, 1].
        foreground, background: (H, W) bool masks (see :func:`mask_view`).

    Returns:
        (2 * H' + 4, 2 * W' + 4, 3) uint8; each panel upscaled (nearest) so its short side
        is >= ``min_side``; white 4 px gaps.
    """
    heat = _blend(image, colorize(attribution), 0.65)
    masks = mask_view(image, foreground, background)
    cutout = np.where(
        foreground[..., None], image, (image.astype(np.float32) * 0.2).astype(np.uint8)
    )
    p = [upscale(a, min_side) for a in (image, heat, masks, cutout)]
    h, w = p[0].shape[:2]
    out = np.full((2 * h + 4, 2 * w + 4, 3), 255, dtype=np.uint8)
    out[:h, :w], out[:h, w + 4 :], out[h + 4 :, :w], out[h + 4 :, w + 4 :] = p
    return out


def highlight_region(
    image: np.ndarray, mask: np.ndarray, color: Sequence[int] = (255, 255, 0), min_side: int = 192
) -> np.ndarray:
    """Show which pixels of a support image formed a prototype.

    Pixels outside ``mask`` are dimmed, the region gets a thin tint and an outline in
    ``color``. Upscaled (nearest) to a short side of at least ``min_side``.

    Args:
        image: (H, W, 3) uint8 support image.
        mask: (H, W) bool region.
    """
    col = np.asarray(color, dtype=np.uint8)
    out = np.where(
        mask[..., None],
        _blend(image, np.broadcast_to(col, image.shape), 0.25),
        (image.astype(np.float32) * 0.3).astype(np.uint8),
    )
    big = upscale(out, min_side)
    f = big.shape[0] // image.shape[0]
    big_mask = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)
    edge = _edges(big_mask)
    thick = edge.copy()
    thick[1:] |= edge[:-1]
    thick[:, 1:] |= edge[:, :-1]
    big[thick] = col
    return big


def part_clusters(
    support: SupportSet, bank: PrototypeBank, image_index: int, min_side: int = 192
) -> tuple[np.ndarray, int]:
    """Colour the K-means part clusters of ``bank`` on one support image.

    Every part prototype's member cells that lie in support image ``image_index`` are
    painted in that prototype's colour (foreground parts in class-palette colours,
    background parts hatched grey-blue), so a learner sees which regions the clustering
    grouped together.

    Returns:
        ((H', W', 3) uint8 picture, number of part clusters present on the image).
    """
    h, w = bank.image_size
    gh, gw = bank.grid_size
    img = support.images[image_index]
    if img.shape[:2] != (h, w):
        img = _resize(img, (h, w))
    painted = np.zeros((h, w, 3), dtype=np.uint8)
    alpha = np.zeros((h, w), dtype=np.float32)
    row_edges, col_edges = cell_edges(h, gh), cell_edges(w, gw)
    present = 0
    kinds = bank.kinds.numpy()
    fg = bank.foreground.numpy()
    fg_parts = [p for p in range(len(bank)) if kinds[p] == PrototypeKind.PART and fg[p]]
    bg_parts = [p for p in range(len(bank)) if kinds[p] == PrototypeKind.PART and not fg[p]]
    for order, group in ((0, fg_parts), (1, bg_parts)):
        for j, p in enumerate(group):
            n, rows, cols = bank.members(p)
            sel = n == image_index
            if not sel.any():
                continue
            present += 1
            if order == 0:
                color = np.asarray(class_color(j + 1), dtype=np.uint8)
                a = 0.7
            else:
                shade = 70 + (37 * j) % 120
                color = np.array([shade // 2, shade // 2, shade], dtype=np.uint8)
                a = 0.5
            for r, c in zip(rows[sel], cols[sel], strict=True):
                ys = slice(row_edges[r], row_edges[r + 1])
                xs = slice(col_edges[c], col_edges[c + 1])
                painted[ys, xs] = color
                alpha[ys, xs] = a
    return upscale(_blend(img, painted, alpha), min_side), present


def legend_html(
    class_names: Sequence[str],
    prefilter: PrefilterResult | None = None,
    queried: Sequence[str] | None = None,
    stuff: Mapping[str, bool] | None = None,
) -> str:
    """HTML legend: one colour swatch per label, then what the pre-filter kept and dropped.

    Args:
        class_names: ``Segmentation.class_names`` (``"background"`` first).
        prefilter: ``Segmentation.prefilter`` (None when it did not run).
        queried: every class asked for (``Segmentation.queried``).
        stuff: ``{name: is stuff}``; stuff classes are marked (they bypass the pre-filter).
    """
    stuff = stuff or {}
    items = []
    for i, name in enumerate(class_names):
        tag = " <small>(stuff)</small>" if stuff.get(name) else ""
        items.append(
            f'<span class="ovd-legend-item" data-label="{i}">'
            f'<span class="ovd-swatch" style="background:{_hex(class_color(i))}"></span>'
            f"{esc(name)}{tag}</span>"
        )
    parts = [f'<div class="ovd-legend">{"".join(items)}</div>']
    if prefilter is not None:
        kept = ", ".join(esc(n) for n in prefilter.kept) or "none"
        dropped = ", ".join(
            f"{esc(n)} (p={prefilter.probabilities.get(n, 0.0):.2f})" for n in prefilter.dropped
        )
        parts.append(
            '<div class="ovd-prefilter"><b>CLIP pre-filter</b> kept: '
            f'<span class="ovd-kept">{kept}</span>; dropped: '
            f'<span class="ovd-dropped">{dropped or "none"}</span></div>'
        )
    elif queried is not None:
        parts.append(
            '<div class="ovd-prefilter">Pre-filter off: every category was kept '
            f"({', '.join(esc(n) for n in queried)}).</div>"
        )
    return "\n".join(parts)


def scores_figure(
    class_scores: Mapping[str, float],
    class_names: Sequence[str],
    winner: str | None = None,
    point: tuple[int, int] | None = None,
) -> go.Figure:
    """Plotly bar chart of every label's score at one pixel (background included).

    Args:
        class_scores: ``{label name: score}`` (``PixelTrace.class_scores``).
        class_names: label order (``Segmentation.class_names``); sets the bar colours.
        winner: the winning label, drawn with a black outline.
        point: the pixel (x, y); stored as ``layout.meta = "x,y"`` (tests and benchmarks
            read it from the drawn chart).
    """
    names = list(class_names)
    values = [float(class_scores.get(n, 0.0)) for n in names]
    colors = [_hex(class_color(i)) for i in range(len(names))]
    lines = [3 if n == winner else 0 for n in names]
    top = max([*values, 0.0])
    # No title: Gradio reserves 100 px above a titled plot; the component's label says it.
    layout = {
        "height": 250,
        "margin": {"l": 50, "r": 10, "t": 20, "b": 40},
        "yaxis": {
            "range": [0, max(1.0, top * 1.15)],
            "title": {"text": "cosine score"},
            "gridcolor": "#e5e5e5",
        },
        "showlegend": False,
        "plot_bgcolor": "white",
    }
    if point is not None:
        layout["meta"] = f"{int(point[0])},{int(point[1])}"
    bar = go.Bar(
        x=names,
        y=values,
        marker={"color": colors, "line": {"color": "black", "width": lines}},
        text=[f"{v:.3f}" for v in values],
        textposition="outside",
        hovertemplate="%{x}: %{y:.4f}<extra></extra>",
    )
    fig = go.Figure(bar, layout=layout)
    return fig


def empty_scores_figure() -> go.Figure:
    """The bar chart's placeholder before any click (also makes the page load plotly.js
    up front instead of on the first click)."""
    return go.Figure(
        layout={
            "height": 250,
            "margin": {"l": 50, "r": 10, "t": 20, "b": 40},
            "yaxis": {"range": [0, 1], "title": {"text": "cosine score"}},
            "plot_bgcolor": "white",
        }
    )


def prototype_scatter(categories: Sequence[Category], extractor: str) -> go.Figure:
    """2-D PCA projection of every prototype of ``categories`` for one extractor.

    Colour = class (same palette as the segmentation, in the given order); symbol = kind
    (star class, square instance, circle part); filled = foreground, open = background.
    """
    from sklearn.decomposition import PCA

    banks = [
        (i, c, c.banks[extractor])
        for i, c in enumerate(categories, start=1)
        if extractor in c.banks and len(c.banks[extractor])
    ]
    fig = go.Figure()
    if banks:
        allv = np.concatenate([b.vectors.float().numpy() for _, _, b in banks])
        n_comp = min(2, allv.shape[0], allv.shape[1])
        xy = PCA(n_components=n_comp).fit_transform(allv) if allv.shape[0] > 1 else allv[:, :2]
        if xy.shape[1] < 2:
            xy = np.concatenate([xy, np.zeros((xy.shape[0], 2 - xy.shape[1]))], axis=1)
        start = 0
        for i, cat, bank in banks:
            pts = xy[start : start + len(bank)]
            start += len(bank)
            kinds = bank.kinds.numpy()
            fg = bank.foreground.numpy()
            for kind in PrototypeKind:
                for is_fg in (True, False):
                    sel = (kinds == int(kind)) & (fg == is_fg)
                    if not sel.any():
                        continue
                    symbol = KIND_SYMBOLS[kind] + ("" if is_fg else "-open")
                    side = "fg" if is_fg else "bg"
                    fig.add_trace(
                        go.Scatter(
                            x=pts[sel, 0],
                            y=pts[sel, 1],
                            mode="markers",
                            name=f"{esc(cat.name)} · {side} · {kind.name.lower()}",
                            marker={
                                "color": _hex(class_color(i)),
                                "symbol": symbol,
                                "size": 13 if kind == PrototypeKind.CLASS else 8,
                                "line": {"width": 1, "color": "black"},
                            },
                            hovertemplate=f"{esc(cat.name)} {side} {kind.name.lower()}"
                            "<extra></extra>",
                        )
                    )
    fig.update_layout(
        height=420,
        margin={"l": 30, "r": 10, "t": 40, "b": 30},
        title={
            "text": f"prototypes of extractor '{esc(extractor)}' (PCA to 2-D)",
            "font": {"size": 13},
        },
        xaxis={"title": "PC 1"},
        yaxis={"title": "PC 2"},
        plot_bgcolor="white",
    )
    return fig


# --------------------------------------------------------------------------- explanations

CHANGED_COLOR = (255, 0, 255)  # what-if: pixels whose label changed


def changed_overlay(overlay: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Mark what-if changes on a label overlay: changed pixels tinted magenta and outlined.

    Args:
        overlay: (H, W, 3) uint8, e.g. from :func:`overlay_labels`.
        changed: (H, W) bool, pixels whose label differs from the original's.

    Returns:
        (H, W, 3) uint8; pixels outside ``changed`` (and off its outline) are unchanged.
    """
    col = np.asarray(CHANGED_COLOR, dtype=np.uint8)
    out = overlay.copy()
    if changed.any():
        out[changed] = _blend(overlay[changed][None], col, 0.6)[0]
        out[_edges(changed) & changed] = col
    return out


def top_prototypes_html(rows: Sequence[dict[str, object]], x: int, y: int) -> str:
    """The top-prototypes table of a clicked pixel.

    Args:
        rows: one dict per prototype, strongest first, with keys ``label``, ``kind``,
            ``share`` (0..1 of that label's score), ``cosine``, ``source`` and
            ``images`` (support image numbers, 1-based, of its support regions).
        x, y: the pixel (input-image coordinates).

    Every name is escaped with :func:`esc`.
    """
    body = "".join(
        f'<tr data-rank="{i + 1}"><td>{i + 1}</td><td>{esc(r["label"])}</td>'
        f"<td>{esc(r['kind'])}</td><td>{100.0 * float(r['share']):.0f}%</td>"  # type: ignore[arg-type]
        f"<td>{float(r['cosine']):.3f}</td><td>{esc(r['source'])}</td>"  # type: ignore[arg-type]
        f"<td>{esc(', '.join(f'#{n}' for n in r['images']) or '-')}</td></tr>"  # type: ignore[attr-defined]
        for i, r in enumerate(rows)
    )
    return (
        f'<div class="ovd-top" data-x="{x}" data-y="{y}" data-rows="{len(rows)}">'
        f"<b>Strongest prototypes at (x={x}, y={y})</b>, all labels together"
        "<table><thead><tr><th>#</th><th>label</th><th>prototype</th>"
        "<th>share of label score</th><th>cosine</th><th>support from</th>"
        "<th>support images</th></tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def atlas_card(
    patches: Sequence[np.ndarray], fires: np.ndarray | None, image: np.ndarray, side: int = 128
) -> np.ndarray:
    """A prototype's card picture: its strongest support patches, then where it fires.

    Args:
        patches: (h, w, 3) uint8 support images with the prototype's region highlighted
            (e.g. :func:`highlight_region`), strongest first.
        fires: (H, W) float cosine of the prototype over ``image`` (None: no map; the
            panel is grey).
        image: (H, W, 3) uint8, the segmented image.
        side: height of every panel in pixels.

    Returns:
        (side, W', 3) uint8: the panels side by side with 4 px white gaps.
    """
    panels = []
    for p in patches:
        w = max(1, round(p.shape[1] * side / p.shape[0]))
        panels.append(_resize(p, (side, w), nearest=True))
    h, w = image.shape[:2]
    fw = max(1, round(w * side / h))
    if fires is None:
        panels.append(np.full((side, fw, 3), 160, dtype=np.uint8))
    else:
        panels.append(
            similarity_overlay(_resize(image, (side, fw)), _resize_float(fires, (side, fw)))
        )
    total = sum(p.shape[1] for p in panels) + 4 * (len(panels) - 1)
    out = np.full((side, total, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[:, x : x + p.shape[1]] = p
        x += p.shape[1] + 4
    return out


def _resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR))
