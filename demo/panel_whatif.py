"""Tab 3's lower panels: what-if edits and the prototype atlas (no model runs).

*What if*: select a support region (trace or top-prototypes gallery) or an atlas card,
then exclude its prototype or its support image: :func:`ovdiff_core.explain.what_if`
re-scores the kept target features, the overlay shows the new labels with the changed
pixels in magenta, and **Restore** shows the original again. Edits accumulate.

*Atlas*: every prototype of a category's bank (one extractor) as a card: its strongest
support patches, where it fires on the image, member cells, pixels won; sortable.

Reads top to bottom: results, handlers (:class:`WhatIfPanel`), layout, wiring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from demo import render
from demo.state import UI, Pick, SegState, prototype_text
from demo.tab_segment import CLICK_HINT, TOP_HINT, pick_text
from ovdiff_core.explain import atlas, fire_map, support_regions, what_if

if TYPE_CHECKING:
    from demo.app import DemoApp

ATLAS_SORTS = {
    "pixels won": "pixels",
    "member cells": "members",
    "peak similarity": "peak",
    "bank order": "index",
}
ATLAS_MAX_CARDS = 64  # cards drawn (the rest are counted in the table)

# --------------------------------------------------------------------------- results


@dataclass
class PickResult:
    """The item the visitor selected for the what-if buttons."""

    pick: Pick | None
    pick_info: str


@dataclass
class WhatIfResult:
    """The segmentation after an exclusion or a restore.

    Attributes:
        overlay: (H, W, 3) uint8 labels of the shown segmentation, changed pixels magenta.
        seg_state: the visitor's :class:`SegState` (``current`` the shown segmentation).
        whatif_status: Markdown: what is excluded, pixels changed, prototypes removed.
        trace_info, trace_plot, trace_sim, trace_regions, region_picks, top_info,
        top_regions, top_picks, atlas_gallery, atlas_info, atlas_picks, pick, pick_info:
            cleared (they explained the segmentation shown before, and prototype
            references change with the banks).
    """

    overlay: np.ndarray
    seg_state: SegState
    whatif_status: str
    trace_info: str
    trace_plot: Any
    trace_sim: np.ndarray | None
    trace_regions: list[Any]
    region_picks: list[Pick]
    top_info: str
    top_regions: list[Any]
    top_picks: list[Pick]
    atlas_gallery: list[Any]
    atlas_info: str
    atlas_picks: list[Pick]
    pick: Pick | None
    pick_info: str


@dataclass
class AtlasResult:
    """A category's prototype atlas.

    Attributes:
        atlas_gallery: (card picture, caption) per prototype, in the chosen order.
        atlas_info: table HTML, one ``tr[data-index]`` per card, same order.
        atlas_picks: what each card points at.
    """

    atlas_gallery: list[tuple[np.ndarray, str]]
    atlas_info: str
    atlas_picks: list[Pick]


# --------------------------------------------------------------------------- handlers


def _need(state: SegState | None) -> SegState:
    if not isinstance(state, SegState):
        raise gr.Error("Segment an image first (tab 3), then explore it.")
    return state


def _status(state: SegState) -> str:
    if not state.edited:
        return "Nothing excluded: this is the segmentation as computed."
    parts = [render.md(prototype_text(r)) for r in state.excluded_prototypes]
    parts += [
        f"{render.md(cat)} support image #{i + 1}"
        for cat, images in state.excluded_images.items()
        for i in images
    ]
    n = int(state.changed.sum()) if state.changed is not None else 0
    total = state.original.labels.size
    return (
        f"**What if** without {'; '.join(parts)}: **{n}** pixels changed label "
        f"({100.0 * n / total:.2f}%, magenta), {len(state.removed)} prototypes removed "
        "from the banks. No model ran. Press **Restore** to undo."
    )


class WhatIfPanel:
    """Handlers of the what-if and atlas panels."""

    def __init__(self, app: DemoApp) -> None:
        self.app = app

    def select(self, picks: list[Pick] | None, index: Any) -> PickResult:
        """The gallery item at ``index`` of a gallery whose items are ``picks``."""
        i = index if isinstance(index, int) else (index[0] if index else None)
        if not picks or not isinstance(i, int) or not 0 <= i < len(picks):
            raise gr.Error("Select a support region or an atlas card first.")
        return PickResult(picks[i], pick_text(picks[i]))

    def _apply(self, state: SegState, edit: Any, **exclude: Any) -> WhatIfResult:
        try:
            result = what_if(state.current, **exclude)
        except ValueError as err:
            raise gr.Error(render.esc(f"What-if failed: {err}")) from None
        edit(state)
        state.current = result.segmentation
        state.removed = [*state.removed, *result.removed]
        state.changed = state.current.labels != state.original.labels
        return self._shown(state)

    def _shown(self, state: SegState) -> WhatIfResult:
        seg = state.current
        overlay = render.overlay_labels(seg.image, seg.labels)
        if state.changed is not None:
            overlay = render.changed_overlay(overlay, state.changed)
        cleared = (
            "<p><i>Press <b>Show atlas</b> for the prototypes of the segmentation shown.</i></p>"
        )
        return WhatIfResult(
            overlay=overlay,
            seg_state=state,
            whatif_status=_status(state),
            trace_info=CLICK_HINT,
            trace_plot=render.empty_scores_figure(),
            trace_sim=None,
            trace_regions=[],
            region_picks=[],
            top_info=TOP_HINT,
            top_regions=[],
            top_picks=[],
            atlas_gallery=[],
            atlas_info=cleared,
            atlas_picks=[],
            pick=None,
            pick_info="Nothing selected.",
        )

    def exclude_prototype(self, state: SegState | None, pick: Pick | None) -> WhatIfResult:
        """Re-score without the selected prototype (references are to ``state.current``)."""
        state = _need(state)
        if pick is None or pick.prototype is None:
            raise gr.Error("Select a support region or an atlas card first, then exclude.")
        ref = pick.prototype
        return self._apply(
            state,
            lambda s: s.excluded_prototypes.append(ref),
            exclude_prototypes=[ref],
        )

    def exclude_image(self, state: SegState | None, pick: Pick | None) -> WhatIfResult:
        """Re-score without every prototype formed with the selected support image."""
        state = _need(state)
        if pick is None or pick.category is None or pick.image_index is None:
            raise gr.Error("Select a support region or an atlas card first, then exclude.")
        cat, i = pick.category, pick.image_index
        if i in state.excluded_images.get(cat, []):
            raise gr.Error(render.esc(f"{cat} support image #{i + 1} is already excluded."))

        def edit(s: SegState) -> None:
            s.excluded_images.setdefault(cat, []).append(i)

        return self._apply(state, edit, exclude_images={cat: [i]})

    def restore(self, state: SegState | None) -> WhatIfResult:
        """Show the original segmentation again (all exclusions dropped)."""
        state = _need(state)
        restored = SegState(original=state.original, current=state.original)
        return self._shown(restored)

    def atlas(
        self, state: SegState | None, category: str | None, extractor: str | None, sort: str
    ) -> AtlasResult:
        """Every prototype of ``category``'s bank for ``extractor`` as a card, sorted by
        ``sort`` (a key of :data:`ATLAS_SORTS`), on the shown segmentation."""
        seg = _need(state).current
        if sort not in ATLAS_SORTS:
            raise gr.Error(f"Sort by one of: {', '.join(ATLAS_SORTS)}.")
        if not category or category not in seg.class_names[1:]:
            raise gr.Error("Choose a category of this segmentation for the atlas.")
        try:
            cards = atlas(seg, category, extractor or "", sort_by=ATLAS_SORTS[sort])  # type: ignore[arg-type]
        except ValueError as err:
            raise gr.Error(render.esc(err)) from None
        tiles, picks, rows = [], [], []
        for n, card in enumerate(cards):
            ref = card.prototype
            side = "fg" if ref.foreground else "bg"
            peak = f"{card.peak:.2f}" if card.peak is not None else "-"
            caption = (
                f"{side} {ref.kind.name.lower()} #{ref.index} · {card.members} cells · "
                f"wins {card.pixels_won} px · peak {peak}"
            )
            top = card.top_images[0][0] if card.top_images else None
            rows.append(
                f'<tr data-index="{ref.index}" data-pixels="{card.pixels_won}" '
                f'data-members="{card.members}"><td>{n + 1}</td>'
                f"<td>{render.esc(side)} {render.esc(ref.kind.name.lower())} #{ref.index}</td>"
                f"<td>{card.members}</td><td>{card.pixels_won}</td><td>{peak}</td>"
                f"<td>{render.esc(', '.join(f'#{i + 1}' for i, _ in card.top_images))}</td></tr>"
            )
            if n >= ATLAS_MAX_CARDS:
                continue
            masks = {r.image_index: r for r in support_regions(seg, ref)}
            patches = [
                render.highlight_region(
                    masks[i].image,
                    masks[i].mask,
                    color=render.class_color(card.channel or 0),
                    min_side=64,
                )
                for i, _ in card.top_images
                if i in masks and masks[i].image is not None
            ]
            tiles.append((render.atlas_card(patches, fire_map(seg, card), seg.image), caption))
            picks.append(Pick(ref, category if top is not None else None, top, caption))
        table = (
            f'<div class="ovd-atlas" data-cards="{len(cards)}"><table><thead><tr><th>#</th>'
            "<th>prototype</th><th>member cells</th><th>pixels won</th><th>peak</th>"
            f"<th>strongest support images</th></tr></thead><tbody>{''.join(rows)}</tbody>"
            "</table></div>"
        )
        return AtlasResult(tiles, table, picks)


# --------------------------------------------------------------------------- layout


def layout(ui: UI) -> None:
    """The what-if and atlas components, added to ``ui`` (inside tab 3)."""
    gr.Markdown(
        "### What if?\nSelect a support region above or an atlas card below, then "
        "exclude its prototype or its whole support image: the labels are re-scored "
        "from the image's kept features (no model runs); changed pixels turn magenta."
    )
    ui.pick_info = gr.Markdown("Nothing selected.", elem_id="pick-info")
    with gr.Row():
        ui.exclude_proto_btn = gr.Button("Exclude this prototype", elem_id="exclude-prototype")
        ui.exclude_image_btn = gr.Button("Exclude this support image", elem_id="exclude-image")
        ui.restore_btn = gr.Button("Restore", elem_id="restore")
    ui.whatif_status = gr.Markdown(elem_id="whatif-status")
    with gr.Accordion("Prototype atlas", open=True):
        with gr.Row():
            ui.atlas_category = gr.Dropdown(choices=[], label="Category", elem_id="atlas-category")
            ui.atlas_extractor = gr.Dropdown(
                choices=[], label="Extractor", elem_id="atlas-extractor"
            )
            ui.atlas_sort = gr.Dropdown(
                choices=list(ATLAS_SORTS), value="pixels won", label="Sort by", elem_id="atlas-sort"
            )
            ui.atlas_btn = gr.Button("Show atlas", elem_id="atlas-show")
        ui.atlas_gallery = gr.Gallery(
            fit_columns=False,
            label="Prototypes: strongest support patches | where it fires on this image",
            columns=3,
            height=420,
            elem_id="atlas-gallery",
            object_fit="contain",
            format="jpeg",
        )
        ui.atlas_info = gr.HTML(elem_id="atlas-info")


# --------------------------------------------------------------------------- wiring


def wire(ui: UI, panel: WhatIfPanel) -> None:
    """The what-if and atlas events."""

    def selector(picks_state: Any) -> Any:
        def on_select(picks: list[Pick] | None, evt: gr.SelectData) -> Any:
            return ui.values(panel.select(picks, evt.index))

        return on_select

    for gallery, picks in (
        (ui.trace_regions, ui.region_picks),
        (ui.top_regions, ui.top_picks),
        (ui.atlas_gallery, ui.atlas_picks),
    ):
        gallery.select(selector(picks), picks, ui.outputs(PickResult), queue=False)

    def on_exclude_proto(state: SegState | None, pick: Pick | None) -> Any:
        return ui.values(panel.exclude_prototype(state, pick))

    def on_exclude_image(state: SegState | None, pick: Pick | None) -> Any:
        return ui.values(panel.exclude_image(state, pick))

    def on_restore(state: SegState | None) -> Any:
        return ui.values(panel.restore(state))

    ui.exclude_proto_btn.click(
        on_exclude_proto, [ui.seg_state, ui.pick], ui.outputs(WhatIfResult), concurrency_limit=4
    )
    ui.exclude_image_btn.click(
        on_exclude_image, [ui.seg_state, ui.pick], ui.outputs(WhatIfResult), concurrency_limit=4
    )
    ui.restore_btn.click(on_restore, ui.seg_state, ui.outputs(WhatIfResult), queue=False)

    def on_atlas(
        state: SegState | None, category: str | None, extractor: str | None, sort: str
    ) -> Any:
        return ui.values(panel.atlas(state, category, extractor, sort))

    gr.on(
        [ui.atlas_btn.click, ui.atlas_sort.change],
        on_atlas,
        [ui.seg_state, ui.atlas_category, ui.atlas_extractor, ui.atlas_sort],
        ui.outputs(AtlasResult),
        concurrency_limit=4,
    )
