"""Tab 2 · Your own support images: photos (optionally painted) become a category.

Reads top to bottom: results, handlers (:class:`PhotosTab`), layout, wiring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from demo import render
from demo.hosting import gpu
from demo.inputs import array_to_rgb, load_image, mask_from_editor
from demo.state import (
    SUPPORT_SIZE_MAX,
    UI,
    Session,
    category_summary,
    category_update,
    check_category_limit,
    checked,
    warn_all,
)
from ovdiff_core.pipeline import clean_category_name

if TYPE_CHECKING:
    from demo.app import DemoApp

# --------------------------------------------------------------------------- results


@dataclass
class PhotosResult:
    """The queue of own photos after adding or clearing one.

    Attributes:
        own_gallery: (photo, caption), painted ones highlighted.
        own_status: status text.
        session: the visitor's session.
    """

    own_gallery: list[tuple[np.ndarray, str]]
    own_status: str
    session: Session


@dataclass
class CreateResult:
    """A category made from the queued photos (fields: the components they update)."""

    own_status: str
    session: Session
    own_gallery: list[Any]
    how_cat: Any


# --------------------------------------------------------------------------- handlers


class PhotosTab:
    """Handlers of tab 2 (in-context mode: ``OVDiff.add_support``)."""

    def __init__(self, app: DemoApp) -> None:
        self.app = app

    def add_photo(self, editor: dict[str, Any] | None, session: Session) -> PhotosResult:
        """Queue the photo in the editor (and its painted foreground) for a new category."""
        if not isinstance(editor, dict) or editor.get("background") is None:
            raise gr.Error(
                "Upload a photo into the editor first (then optionally paint the object)."
            )
        notes: list[str] = []
        photo = checked(array_to_rgb, np.asarray(editor["background"]), notes)
        loaded = checked(load_image, photo)
        warn_all(notes + loaded.notes)
        mask = mask_from_editor(editor, loaded.image.shape[:2])
        if mask is not None and not mask.any():
            mask = None
        if len(session.photos) >= SUPPORT_SIZE_MAX:
            raise gr.Error(f"At most {SUPPORT_SIZE_MAX} photos per category.")
        session.photos.append((loaded.image, mask))
        painted = sum(m is not None for _, m in session.photos)
        status = (
            f"{len(session.photos)} photo(s) queued, {painted} with a painted foreground. "
            "Add more or create the category."
        )
        return PhotosResult(self._photo_gallery(session), status, session)

    @staticmethod
    def _photo_gallery(session: Session) -> list[tuple[np.ndarray, str]]:
        out = []
        for i, (img, mask) in enumerate(session.photos, start=1):
            if mask is None:
                out.append((img, f"photo {i} · no mask"))
            else:
                out.append((render.highlight_region(img, mask, min_side=1), f"photo {i} · painted"))
        return out

    def clear_photos(self, session: Session) -> PhotosResult:
        session.photos = []
        return PhotosResult([], "No photos queued.", session)

    def create_category(
        self, name: str, stuff: bool, preset: str, session: Session
    ) -> CreateResult:
        """Turn the queued photos into a category (in-context mode, ``OVDiff.add_support``)."""
        app = self.app
        clean = checked(clean_category_name, name or "")
        if not session.photos:
            raise gr.Error("No photos queued: upload a photo and press 'Add photo' first.")
        check_category_limit(session, [clean], preset)
        model = app.model(preset, session.support_size)
        if not app.generation.acquire(blocking=False):
            raise gr.Error("A build is already running; wait for it to finish, then try again.")
        try:
            support = checked(app.own_photos(model), clean, session.photos)
            events = list(model.add_support_iter(support, stuff=bool(stuff)))
            cat = events[-1].category_result
            if cat is None:
                raise RuntimeError("the build ended without a category")
        except (ValueError, RuntimeError, OSError) as err:
            message = f"Could not make '{clean}' from your photos: {err}"
            raise gr.Error(render.esc(message)) from None
        finally:
            app.generation.release()
        if session.preset not in (None, preset) and session.categories:
            gr.Warning(f"Preset changed to '{preset}': categories of '{session.preset}' removed.")
            session.categories = {}
        session.preset = preset
        session.categories.pop(clean, None)
        session.categories[clean] = cat
        session.photos = []
        unsaved = [ev.warning for ev in events if ev.warning]
        if unsaved:
            gr.Warning(unsaved[0])
        note = " (not saved to the cache)" if unsaved else ""
        status = category_summary(cat) + f" (from your photos){note}. Segment an image in tab 3."
        return CreateResult(status, session, [], category_update(session))


# --------------------------------------------------------------------------- layout


def layout(ui: UI) -> None:
    """Tab 2's components, added to ``ui``."""
    gr.Markdown(
        "In-context mode: instead of generated images, use your own photos of a "
        "category. Upload a photo, paint over the object with the brush (the "
        "foreground), press **Add photo**; repeat, then **Create category**."
    )
    with gr.Row():
        with gr.Column():
            ui.own_name = gr.Textbox(label="Category name", elem_id="own-name")
            ui.own_stuff = gr.Checkbox(label="stuff (amorphous region)", value=False)
            ui.editor = gr.ImageEditor(
                type="numpy",
                label="Photo (paint the object)",
                sources=("upload", "clipboard"),
                transforms=(),
                layers=False,
                brush=gr.Brush(colors=["#22dd55"], color_mode="fixed"),
                elem_id="own-editor",
            )
            with gr.Row():
                ui.add_btn = gr.Button("Add photo", elem_id="own-add")
                ui.clear_btn = gr.Button("Clear photos")
            ui.create_btn = gr.Button("Create category", variant="primary", elem_id="own-create")
        with gr.Column():
            ui.own_status = gr.Markdown("No photos queued.", elem_id="own-status")
            ui.own_gallery = gr.Gallery(
                label="Queued photos", columns=3, height=360, fit_columns=False
            )


# --------------------------------------------------------------------------- wiring


def wire(ui: UI, tab: PhotosTab) -> None:
    """Tab 2's events."""

    def on_add(editor: dict[str, Any] | None, session: Session) -> Any:
        return ui.values(tab.add_photo(editor, session))

    def on_clear(session: Session) -> Any:
        return ui.values(tab.clear_photos(session))

    # ZeroGPU: the GPU call returns picklable values; the dict is made outside it
    create_gpu = gpu(tab.app.own_photos_seconds)(tab.create_category)

    def on_create(name: str, stuff: bool, preset: str, session: Session) -> Any:
        return ui.values(create_gpu(name, stuff, preset, session))

    ui.add_btn.click(on_add, [ui.editor, ui.session], ui.outputs(PhotosResult))
    ui.clear_btn.click(on_clear, ui.session, ui.outputs(PhotosResult))
    ui.create_btn.click(
        on_create,
        [ui.own_name, ui.own_stuff, ui.preset, ui.session],
        ui.outputs(CreateResult),
        concurrency_limit=1,
        concurrency_id="own-photos",
    )
