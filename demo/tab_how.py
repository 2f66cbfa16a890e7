"""Tab 4 · How it works: the pipeline's real intermediate data on the visitor's data.

Reads top to bottom: result, handler (:class:`HowTab`), layout, wiring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from demo import render
from demo.inputs import bounded_number
from demo.state import SUPPORT_SIZE_MAX, UI, SegState, Session, checked, current
from ovdiff_core.segment import Segmentation
from ovdiff_core.types import SupportSet

if TYPE_CHECKING:
    from demo.app import DemoApp

# --------------------------------------------------------------------------- result


@dataclass
class HowResult:
    """Steps 1-7 for one category and support image.

    Attributes:
        how_settings: prompt and generation settings (Markdown).
        how_photo, how_attr, how_masks, how_parts: (H, W, 3) uint8 pictures (None: no
            support set).
        how_parts_caption: caption of the part clusters (Markdown).
        how_scatter: PCA scatter of all prototypes (plotly).
        how_maps: score maps of the shown segmentation (empty before segmenting).
        how_argmax: its labels over the image (None before segmenting).
        how_img: update of the support-image slider (range and the index shown).
    """

    how_settings: str
    how_photo: np.ndarray | None
    how_attr: np.ndarray | None
    how_masks: np.ndarray | None
    how_parts: np.ndarray | None
    how_parts_caption: str
    how_scatter: Any
    how_maps: list[tuple[np.ndarray, str]]
    how_argmax: np.ndarray | None
    how_img: dict[str, Any]


# --------------------------------------------------------------------------- handler


def explain_settings(support: SupportSet | None) -> str:
    if support is None:
        return "This category has no support set attached."
    settings = support.settings or {}
    prompt = settings.get("prompt")
    head = (
        f"**Prompt:** “{render.md(str(prompt).replace('{}', support.category))}”"
        if prompt
        else "**Prompt:** this generator draws images without a text prompt."
    )
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    if len(text) > 1500:
        text = text[:1500] + "\n..."
    # raw HTML, not a code fence: a value containing ``` could close a fence
    return (
        f"{head}\n\n<details><summary>all generation settings</summary>"
        f"<pre>{render.esc(text)}</pre></details>"
    )


class HowTab:
    """Handler of tab 4."""

    def __init__(self, app: DemoApp) -> None:
        self.app = app

    def explain(
        self,
        session: Session,
        state: SegState | Segmentation | None,
        name: str | None,
        image_index: float | None,
    ) -> HowResult:
        """The pipeline's real intermediate data for one category and support image."""
        if not session.categories:
            raise gr.Error("Build at least one category first (tab 1), then come back here.")
        seg = current(state)
        cat = session.categories.get(name or "") or next(reversed(session.categories.values()))
        support = cat.support
        extractor = next(iter(cat.banks))
        bank = cat.banks[extractor]
        n = len(support) if support is not None else 0
        last = max(n - 1, 0)
        if image_index is None or image_index == "":
            image_index = 0
        try:  # NaN, infinities and non-numbers are refused; finite numbers are clamped
            checked(bounded_number, image_index, "Support image index", -(2**31), 2**31)
        except gr.Error:
            raise gr.Error(
                render.esc(
                    f"Support image index must be a whole number from 0 to {last}, got "
                    f"{image_index!r}; move the slider to pick a support image."
                )
            ) from None
        i = min(max(round(float(image_index)), 0), last)
        photo = attribution = masks = clusters = None
        caption = "This category has no support images."
        if support is not None:
            img = support.images[i]
            photo = render.upscale(img, 192)
            attribution = render.upscale(render.colorize(support.attributions[i]), 192)
            masks = render.upscale(
                render.mask_view(img, support.foreground[i], support.background[i]), 192
            )
            clusters, present = render.part_clusters(support, bank, i)
            caption = (
                f"{present} of the K-means part prototypes of '{render.md(cat.name)}' "
                f"(extractor <code>{render.esc(extractor)}</code>) have member cells on "
                f"support image #{i + 1}; each colour is one part (greyish blue: background parts)."
            )
        fig = render.prototype_scatter(list(session.categories.values()), extractor)
        maps: list[tuple[np.ndarray, str]] = []
        argmax = None
        if seg is not None:
            maps = self.app.tab_segment.score_maps(seg)
            argmax = render.overlay_labels(seg.image, seg.labels)
        return HowResult(
            how_settings=explain_settings(support),
            how_photo=photo,
            how_attr=attribution,
            how_masks=masks,
            how_parts=clusters,
            how_parts_caption=caption,
            how_scatter=fig,
            how_maps=maps,
            how_argmax=argmax,
            how_img=gr.update(maximum=max(n - 1, 1), value=i),
        )


# --------------------------------------------------------------------------- layout


def layout(ui: UI) -> None:
    """Tab 4's components, added to ``ui``."""
    gr.Markdown(
        "The steps of OVDiff on *your* data. Choose a built category and one of "
        "its support images, then press **Explain**."
    )
    with gr.Row():
        ui.how_cat = gr.Dropdown(choices=[], label="Category", elem_id="how-category")
        ui.how_img = gr.Slider(
            0,
            SUPPORT_SIZE_MAX - 1,
            value=0,
            step=1,
            label="Support image index",
            elem_id="how-image",
        )
        ui.how_btn = gr.Button("Explain", variant="primary", elem_id="how-explain")
    gr.Markdown("#### 1 · Prompt → support image\nA text-to-image model draws the category name.")
    ui.how_settings = gr.Markdown(elem_id="how-settings")
    with gr.Row():
        ui.how_photo = gr.Image(label="support image", interactive=False, elem_id="how-photo")
        ui.how_attr = gr.Image(
            label="2 · attribution map (cross-attention to the name)",
            interactive=False,
            elem_id="how-attribution",
        )
        ui.how_masks = gr.Image(
            label="3 · masks: green foreground, blue background",
            interactive=False,
            elem_id="how-masks",
        )
        ui.how_parts = gr.Image(
            label="4 · feature clusters (part prototypes)", interactive=False, elem_id="how-parts"
        )
    ui.how_parts_caption = gr.Markdown()
    gr.Markdown(
        "#### 5 · Prototypes\nClass-level (star), instance-level (square) and "
        "part-level (circle) prototypes of every category; filled = "
        "foreground, open = background. Nearby points are similar features."
    )
    ui.how_scatter = gr.Plot(label="prototypes, PCA", elem_id="how-scatter")
    gr.Markdown(
        "#### 6 · Score maps → 7 · argmax\nEach pixel's cosine to the best "
        "prototype of every label (from tab 3's segmentation), then the "
        "label with the highest score."
    )
    ui.how_maps = gr.Gallery(
        columns=4, height=260, label="score maps", elem_id="how-maps", fit_columns=False
    )
    ui.how_argmax = gr.Image(label="argmax = segmentation", interactive=False, elem_id="how-argmax")


# --------------------------------------------------------------------------- wiring


def wire(ui: UI, tab: HowTab) -> None:
    """Tab 4's events."""

    def on_explain(
        session: Session, state: SegState | None, name: str | None, index: float | None
    ) -> Any:
        return ui.values(tab.explain(session, state, name, index))

    gr.on(
        [ui.how_btn.click, ui.how_img.release],
        on_explain,
        [ui.session, ui.seg_state, ui.how_cat, ui.how_img],
        ui.outputs(HowResult),
    )
