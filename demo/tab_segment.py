"""Tab 3 · Segment & trace: segment a photo, click a pixel to see why it got its label.

Reads top to bottom: results, handlers (:class:`SegmentTab`; a click runs no model, only
:func:`ovdiff_core.trace` and :func:`ovdiff_core.explain.top_prototypes`), layout,
wiring. The what-if and atlas panels below the trace are :mod:`demo.panel_whatif`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from demo import render
from demo.hosting import gpu
from demo.inputs import MAX_SIDE, click_point, load_upload
from demo.state import (
    KIND_NAMES,
    MAX_REGION_TILES,
    SIMILARITY_SIDE,
    UI,
    Pick,
    SegState,
    Session,
    checked,
    current,
    prototype_text,
    upload_image,
    warn_all,
)
from ovdiff_core.explain import support_regions, top_prototypes
from ovdiff_core.segment import Segmentation
from ovdiff_core.trace import PixelTrace, trace

if TYPE_CHECKING:
    from demo.app import DemoApp

TOP_K = 5  # prototypes in the top-prototypes table
TOP_REGIONS = 2  # support regions shown per top prototype (the largest ones)
CLICK_HINT = "<p><i>Click any pixel of the segmentation to trace its label.</i></p>"
TOP_HINT = "<p><i>The strongest prototypes at the clicked pixel show here.</i></p>"

# --------------------------------------------------------------------------- results


@dataclass
class SegmentResult:
    """A new segmentation; every explanation of the previous one cleared.

    Attributes:
        overlay: (H, W, 3) uint8 labels over the image.
        legend: legend HTML (with the CLIP pre-filter's choices).
        seg_state: the visitor's :class:`SegState` (no edits yet).
        trace_info, trace_plot, trace_sim, trace_regions, region_picks: cleared trace.
        top_info, top_regions, top_picks: cleared top prototypes.
        maps_gallery: cleared score maps.
        whatif_status: what-if status (nothing excluded).
        pick, pick_info: cleared what-if selection.
        atlas_category, atlas_extractor: dropdown updates (this segmentation's classes and
            extractors).
        atlas_gallery, atlas_info, atlas_picks: cleared atlas.
    """

    overlay: np.ndarray
    legend: str
    seg_state: SegState
    trace_info: str
    trace_plot: Any
    trace_sim: np.ndarray | None
    trace_regions: list[Any]
    region_picks: list[Pick]
    top_info: str
    top_regions: list[Any]
    top_picks: list[Pick]
    maps_gallery: list[Any]
    whatif_status: str
    pick: Pick | None
    pick_info: str
    atlas_category: Any
    atlas_extractor: Any
    atlas_gallery: list[Any]
    atlas_info: str
    atlas_picks: list[Pick]


@dataclass
class TraceResult:
    """The clicked pixel explained (the chart comes from a parallel call).

    Attributes:
        trace_info: trace HTML (``data-x``, ``data-y``, ``data-label`` on its root).
        trace_sim: the winning prototype's similarity map with the point marked (long
            side <= ``SIMILARITY_SIDE``).
        trace_regions: (highlighted support region, caption) of the winner.
        region_picks: what each region tile points at (for the what-if buttons).
        clicked: the pixel [x, y] (the top-prototypes call that follows reads it).
    """

    trace_info: str
    trace_sim: np.ndarray
    trace_regions: list[tuple[np.ndarray, str]]
    region_picks: list[Pick]
    clicked: list[int]


@dataclass
class ChartResult:
    """Plotly bar chart of every label's score at the clicked pixel."""

    trace_plot: Any


@dataclass
class TopResult:
    """The ``TOP_K`` strongest prototypes at the clicked pixel, all labels together.

    Attributes:
        top_info: table HTML (``data-rows`` on its root; one ``tr[data-rank]`` a row).
        top_regions: (support region, caption) of each, at most ``TOP_REGIONS`` each.
        top_picks: what each region tile points at.
    """

    top_info: str
    top_regions: list[tuple[np.ndarray, str]]
    top_picks: list[Pick]


# --------------------------------------------------------------------------- handlers


def _prototype_label(tr: PixelTrace) -> str:
    w = tr.winner
    if w is None:
        return "none (this label had no prototypes)"
    side = "foreground" if w.foreground else "background"
    where = f", support image #{w.image_index + 1}" if w.image_index >= 0 else ""
    return (
        f"<b>{render.esc(w.category)}</b> · {side} · {KIND_NAMES[w.kind]} prototype "
        f"#{w.index}{where} (extractor <code>{render.esc(w.extractor)}</code>)"
    )


def _trace_html(tr: PixelTrace) -> str:
    share = 100.0 * tr.winner_share / tr.score if tr.score > 0 else 0.0
    rows = "".join(
        f"<tr><td>{render.esc(name)}</td><td>{value:.3f}</td></tr>"
        for name, value in sorted(tr.class_scores.items(), key=lambda kv: -kv[1])
    )
    regions = len(tr.regions)
    region_text = (
        f"Formed from {regions} support image{'s' if regions != 1 else ''} (highlighted below)."
        if regions
        else "No support images to show."
    )
    label = render.esc(tr.label_name)
    if tr.similarity_map is None and tr.winner is not None:
        region_text += (
            " Its similarity map was not kept: this segmentation keeps the maps of the"
            " prototypes that win the most cells, within its memory budget."
        )
    return (
        f'<div class="ovd-trace" data-x="{tr.x}" data-y="{tr.y}" data-label="{label}">'
        f"<h3>Pixel (x={tr.x}, y={tr.y}) → {label}</h3>"
        f"<p>Score <b>{tr.score:.3f}</b>. Winning prototype: {_prototype_label(tr)}; it "
        f"supplies {tr.winner_share:.3f} of the score ({share:.0f}%), mean cosine "
        f"{tr.winner_cosine:.3f}. {region_text}</p>"
        f"<details><summary>All scores at this pixel</summary><table>{rows}</table></details>"
        "</div>"
    )


class SegmentTab:
    """Handlers of tab 3: segmenting and the click explanations (no model on a click)."""

    def __init__(self, app: DemoApp) -> None:
        self.app = app

    def check_segment(self, upload: Any, session: Session) -> None:
        """Raise ``gr.Error`` for what :meth:`segment` would refuse (no side effects)."""
        if not session.categories:
            raise gr.Error("No categories yet: build some in tab 1 (or from your photos in tab 2).")
        checked(load_upload, upload, MAX_SIDE)  # kept: segment() does not decode again

    def segment(self, upload: Any, session: Session) -> SegmentResult:
        """Segment the uploaded image into the visitor's categories, keeping the target
        features (``keep_features=True``) so that what-if edits run no model."""
        loaded = checked(load_upload, upload, MAX_SIDE)
        warn_all(loaded.notes)
        if not session.categories:
            raise gr.Error("No categories yet: build some in tab 1 (or from your photos in tab 2).")
        model = self.app.model(session.preset, session.support_size)
        cats = list(session.categories.values())
        try:
            seg = model.segment(loaded.image, cats, keep_features=True)
        except ValueError as err:
            raise gr.Error(render.esc(f"Segmentation failed: {err}")) from None
        stuff = {c.name: c.stuff for c in cats}
        classes = seg.class_names[1:]
        return SegmentResult(
            overlay=render.overlay_labels(seg.image, seg.labels),
            legend=render.legend_html(seg.class_names, seg.prefilter, seg.queried, stuff),
            seg_state=SegState(original=seg, current=seg),
            trace_info=CLICK_HINT,
            trace_plot=render.empty_scores_figure(),
            trace_sim=None,
            trace_regions=[],
            region_picks=[],
            top_info=TOP_HINT,
            top_regions=[],
            top_picks=[],
            maps_gallery=[],
            whatif_status="Nothing excluded: this is the segmentation as computed.",
            pick=None,
            pick_info="Nothing selected.",
            atlas_category=gr.update(choices=classes, value=classes[0] if classes else None),
            atlas_extractor=gr.update(choices=list(seg.extractors), value=seg.extractors[0]),
            atlas_gallery=[],
            atlas_info="",
            atlas_picks=[],
        )

    def score_maps(self, state: SegState | Segmentation | None) -> list[tuple[np.ndarray, str]]:
        """Every label's score map (background first), as heatmaps with captions."""
        seg = current(state)
        if seg is None:
            raise gr.Error("Segment an image first; score maps belong to a segmentation.")
        out = []
        for k, name in enumerate(seg.class_names):
            s = seg.score_map(k)
            out.append(
                (
                    render.colorize(s),
                    f"{name}: max {float(s.max()):.3f}, mean {float(s.mean()):.3f}",
                )
            )
        return out

    # ---------------------------------------------------------------- a click

    def trace_panel(
        self, state: SegState | Segmentation | None, index: Sequence[Any] | None
    ) -> TraceResult:
        """Explain the clicked pixel ([x, y] in the segmented image's pixels) with
        :func:`ovdiff_core.trace`. The browser marks the point on the segmentation
        itself (``static/marker.js``), so the large overlay is not re-sent."""
        seg = current(state)
        x, y = checked(click_point, index, seg.size if seg is not None else None)
        assert seg is not None  # click_point raised otherwise
        tr = trace(seg, x, y)
        color = render.class_color(tr.label)
        if tr.similarity_map is None:  # not kept (budget): the image and the point only
            sim = render.similarity_overlay(
                seg.image, np.zeros(seg.size, np.float32), 0.0, (x, y), SIMILARITY_SIDE
            )
        else:
            sim = render.similarity_overlay(
                seg.image, tr.similarity_map, point=(x, y), max_side=SIMILARITY_SIDE
            )
        regions, picks = [], []
        owner = tr.winner.category if tr.winner else ""
        for reg in tr.regions[:MAX_REGION_TILES]:
            if reg.image is None:
                continue
            tile = render.highlight_region(reg.image, reg.mask, color=color, min_side=128)
            caption = f"{owner} support #{reg.image_index + 1}"
            regions.append((tile, caption))
            picks.append(Pick(tr.winner, owner, reg.image_index, caption))
        return TraceResult(_trace_html(tr), sim, regions, picks, [x, y])

    def trace_chart(
        self, state: SegState | Segmentation | None, index: Sequence[Any] | None
    ) -> ChartResult:
        """Plotly bar chart of every label's score at the clicked pixel (background first).

        The bars are ``seg.scores_at(x, y)``, the numbers :func:`ovdiff_core.trace`
        reports as ``class_scores``; read directly so that this chart, the costliest
        part of the panel for a browser to draw, is computed in a parallel call.
        """
        seg = current(state)
        x, y = checked(click_point, index, seg.size if seg is not None else None)
        assert seg is not None
        at = seg.scores_at(x, y)
        scores = {n: float(at[k]) for k, n in enumerate(seg.class_names)}
        label = seg.class_names[int(seg.labels[y, x])]
        return ChartResult(render.scores_figure(scores, seg.class_names, label, point=(x, y)))

    def top_panel(
        self, state: SegState | Segmentation | None, index: Sequence[Any] | None, k: int = TOP_K
    ) -> TopResult:
        """The ``k`` strongest prototypes at the clicked pixel across all labels
        (:func:`ovdiff_core.explain.top_prototypes`), each with its label, kind, share of
        that label's score, source category and the support regions that formed it."""
        seg = current(state)
        x, y = checked(click_point, index, seg.size if seg is not None else None)
        assert seg is not None
        rows: list[dict[str, object]] = []
        tiles: list[tuple[np.ndarray, str]] = []
        picks: list[Pick] = []
        for rank, p in enumerate(top_prototypes(seg, x, y, k), start=1):
            ref = p.prototype
            regions = support_regions(seg, ref)
            side = "foreground" if ref.foreground else "background"
            rows.append(
                {
                    "label": p.label_name,
                    "kind": f"{side} {KIND_NAMES[ref.kind]} #{ref.index} ({ref.extractor})",
                    "share": p.share,
                    "cosine": p.cosine,
                    "source": p.source,
                    "images": [r.image_index + 1 for r in regions],
                }
            )
            color = render.class_color(p.channel)
            strongest = sorted(regions, key=lambda r: (-int(r.mask.sum()), r.image_index))
            for reg in strongest[:TOP_REGIONS]:
                if reg.image is None:
                    continue
                caption = f"#{rank} {p.source} support #{reg.image_index + 1}"
                tiles.append(
                    (
                        render.highlight_region(reg.image, reg.mask, color=color, min_side=96),
                        caption,
                    )
                )
                picks.append(Pick(ref, p.source, reg.image_index, caption))
        return TopResult(render.top_prototypes_html(rows, x, y), tiles, picks)

    def trace_at(
        self, state: SegState | Segmentation | None, index: Sequence[Any] | None
    ) -> tuple[TraceResult, ChartResult]:
        """:meth:`trace_panel` and :meth:`trace_chart` in one call (benchmarks)."""
        return self.trace_panel(state, index), self.trace_chart(state, index)


def pick_text(pick: Pick) -> str:
    """Markdown naming a selected item (escaped)."""
    parts = []
    if pick.prototype is not None:
        parts.append(f"prototype **{render.md(prototype_text(pick.prototype))}**")
    if pick.category is not None and pick.image_index is not None:
        parts.append(f"support image **{render.md(pick.category)} #{pick.image_index + 1}**")
    return "Selected: " + " and ".join(parts) if parts else "Nothing selected."


# --------------------------------------------------------------------------- layout


def layout(ui: UI, app: DemoApp) -> None:
    """Tab 3's segmentation and trace components, added to ``ui``."""
    with gr.Row():
        with gr.Column(scale=1):
            ui.upload = upload_image(
                label="Image to segment",
                sources=["upload", "clipboard"],
                elem_id="upload",
                height=320,
            )
            if app.info.examples:
                gr.Examples(app.info.examples, inputs=[ui.upload], label="Examples")
            ui.segment_btn = gr.Button("Segment", variant="primary", elem_id="segment")
        with gr.Column(scale=2):
            ui.overlay = gr.Image(
                label="Segmentation: click a pixel to trace it (magenta: changed by what-if)",
                interactive=False,
                elem_id="overlay",
                height=480,
                buttons=["download", "fullscreen"],
            )
            ui.legend = gr.HTML(elem_id="legend")
    with gr.Accordion("Per-class score maps", open=False):
        ui.maps_btn = gr.Button("Show score maps", elem_id="show-maps")
        ui.maps_gallery = gr.Gallery(
            fit_columns=False,
            label="Score maps (magma: 0 dark, 1 bright)",
            columns=4,
            height=300,
            elem_id="score-maps",
        )
    gr.Markdown("### Why this label?")
    ui.trace_info = gr.HTML(
        "<p><i>Segment an image, then click any pixel of the result.</i></p>",
        elem_id="trace-info",
    )
    with gr.Row():
        ui.trace_plot = gr.Plot(
            render.empty_scores_figure(),
            label="Score of every label at the clicked pixel",
            elem_id="trace-plot",
        )
        ui.trace_sim = gr.Image(
            label="Similarity of the winning prototype over the image (point marked)",
            interactive=False,
            elem_id="trace-sim",
            height=300,
            format="jpeg",
        )
    ui.trace_regions = gr.Gallery(
        fit_columns=False,
        label="Support regions that formed the winning prototype (select one for what-if)",
        columns=6,
        height=240,
        elem_id="trace-regions",
        object_fit="contain",
        format="jpeg",
    )
    gr.Markdown("### Top prototypes at this pixel")
    ui.top_info = gr.HTML(TOP_HINT, elem_id="top-info")
    ui.top_regions = gr.Gallery(
        fit_columns=False,
        label="Support regions of the top prototypes (select one for what-if)",
        columns=8,
        height=200,
        elem_id="top-regions",
        object_fit="contain",
        format="jpeg",
    )


# --------------------------------------------------------------------------- wiring


def wire(ui: UI, tab: SegmentTab) -> None:
    """Tab 3's segmentation and click events."""
    segment_gpu = gpu(tab.app.segment_seconds)(tab.segment)

    def on_segment(upload: Any, session: Session) -> Any:
        return ui.values(segment_gpu(upload, session))

    ui.segment_btn.click(
        tab.check_segment,
        [ui.upload, ui.session],
        None,
        concurrency_limit=None,
        show_progress="hidden",
    ).success(
        on_segment,
        [ui.upload, ui.session],
        ui.outputs(SegmentResult),
        concurrency_limit=2,
        concurrency_id="segment",
        api_name="segment",  # a stable name for API clients (benchmarks/soak.py)
    )
    ui.maps_btn.click(tab.score_maps, ui.seg_state, ui.maps_gallery)

    def on_trace(state: SegState | None, evt: gr.SelectData) -> Any:
        return ui.values(tab.trace_panel(state, evt.index))

    def on_chart(state: SegState | None, evt: gr.SelectData) -> Any:
        return ui.values(tab.trace_chart(state, evt.index))

    def on_top(state: SegState | None, clicked: list[int] | None) -> Any:
        return ui.values(tab.top_panel(state, clicked))

    # A click runs no model: plain HTTP calls (no queue round trips). Two run in
    # parallel: the text, similarity map and support regions; and the plotly chart,
    # which costs the browser more to draw than all the rest, so the panel does not wait
    # for it. The top prototypes follow the panel (in parallel they slowed it down on a
    # busy 2-core machine: benchmarks/bench_click.py).
    trace_event = ui.overlay.select(
        on_trace,
        ui.seg_state,
        ui.outputs(TraceResult),
        show_progress="hidden",
        queue=False,
        trigger_mode="always_last",
    )
    trace_event.success(
        on_top,
        [ui.seg_state, ui.clicked],
        ui.outputs(TopResult),
        show_progress="hidden",
        queue=False,
    )
    ui.overlay.select(
        on_chart,
        ui.seg_state,
        ui.outputs(ChartResult),
        show_progress="hidden",
        queue=False,
        trigger_mode="always_last",
    )
