"""OVDiff Explorer: build categories, segment a photo, click a pixel to see why.

This module holds what the tabs share (:class:`DemoApp`: models, locks, tile store,
session clean-up) and assembles the page (:func:`build_demo`). Each tab is a module of
its own that reads top to bottom (results, handlers, layout, wiring):
:mod:`demo.tab_build` (1 · Categories), :mod:`demo.tab_photos` (2 · own support
images), :mod:`demo.tab_segment` and :mod:`demo.panel_whatif` (3 · Segment & trace,
what-if, atlas), :mod:`demo.tab_how` (4 · How it works). Every number on screen comes
from ``ovdiff_core``; clicking a pixel or a what-if edit runs no model. CSS and JS are
``demo/static/``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from PIL import Image

from demo import panel_whatif, tab_build, tab_how, tab_photos, tab_segment
from demo.hosting import HostingConfig, build_seconds, gpu, segment_seconds
from demo.inputs import MAX_SIDE, split_names_leniently
from demo.models import (
    BackendInfo,
    ModelFactory,
    ModelPool,
    OwnPhotoSupport,
    backend_info,
)
from demo.state import (
    CSS,
    MARKER_JS,
    SUBTITLE,
    SUPPORT_SIZE_MAX,
    SUPPORT_SIZE_MIN,
    TITLE,
    UI,
    Session,
    TileStore,
)
from ovdiff_core.pipeline import BuildProgress, OVDiff

__all__ = ["CSS", "MARKER_JS", "DemoApp", "Session", "build_demo"]

log = logging.getLogger("ovdiff.demo")


def _page_progress(progress: Callable[..., Any]) -> Callable[[str, float | None, str], None]:
    """Adapt a ``gr.Progress``-like callable to the model loaders' progress hook
    ``(stage, fraction, message)``: shows ``message`` with ``fraction`` in the page
    (``fraction`` None: a message without a bar position)."""

    def hook(stage: str, fraction: float | None, message: str) -> None:
        progress(fraction, desc=message)

    return hook


class DemoApp:
    """The demo's handlers, one method per UI action (thin wrappers over ``ovdiff_core``).

    Handlers live in one object per tab: ``tab_build`` (:class:`~demo.tab_build.CategoriesTab`),
    ``tab_photos``, ``tab_segment``, ``whatif`` (:class:`~demo.panel_whatif.WhatIfPanel`)
    and ``tab_how``; each returns a dataclass named after the components it updates.

    Args:
        model_factory: (preset, support-set size) -> :class:`OVDiff`; called once per
            distinct setting, models shared by all visitors.
        info: how to present the backend (banner, ready sets, examples).
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        info: BackendInfo,
        hosting: HostingConfig | None = None,
    ) -> None:
        self.pool = ModelPool(model_factory)
        self.info = info
        self.hosting = hosting or HostingConfig(zero_gpu=False)
        self.max_support = min(self.hosting.max_support, SUPPORT_SIZE_MAX)
        self.blocks: gr.Blocks | None = None  # set by build_demo (session clean-up)
        # Generating support images: one category at a time per process (the attention
        # capture hooks a shared UNet). Categories served from the cache never take it.
        self.generation = threading.Lock()
        self.build_class_gpu = gpu(self.class_seconds)(self.build_class)
        self.tiles = TileStore(max_bytes=self.hosting.tiles_max_mb * 2**20)
        # by id() of the pool's models: (the model, kept alive while held, its maker)
        self._own: dict[int, tuple[OVDiff, OwnPhotoSupport]] = {}
        self._own_lock = threading.Lock()
        self.tab_build = tab_build.CategoriesTab(self)
        self.tab_photos = tab_photos.PhotosTab(self)
        self.tab_segment = tab_segment.SegmentTab(self)
        self.whatif = panel_whatif.WhatIfPanel(self)
        self.tab_how = tab_how.HowTab(self)

    # ---------------------------------------------------------------- models

    def model(
        self,
        preset: str | None,
        support_size: int | None,
        progress: Callable[..., Any] | None = None,
    ) -> OVDiff:
        """The shared model of (preset, support-set size), loading it on first use.

        ``progress``: optional ``gr.Progress``-like callable, called as
        ``progress(fraction, desc=message)`` while models are checked, downloaded
        (bytes) and loaded, e.g. ``progress(0.25, desc="Loading CLIP ViT-B/16 (2/4)...")``.
        """
        if preset not in self.hosting.presets:
            raise gr.Error(f"Choose a preset ({', '.join(self.hosting.presets)}).")
        hook = _page_progress(progress) if progress is not None else None
        try:
            return self.pool.get(preset, support_size, progress=hook)
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(f"The models could not be loaded: {err}") from None

    def own_photos(self, model: OVDiff) -> OwnPhotoSupport:
        """The own-photo support maker of ``model`` (made once per model; makers of
        models the pool has dropped are dropped too)."""
        with self._own_lock:
            self._own = {k: v for k, v in self._own.items() if self.pool.holds(v[0])}
            key = id(model)
            if key not in self._own or self._own[key][0] is not model:
                self._own[key] = (model, OwnPhotoSupport(model))
            return self._own[key][1]

    # ---------------------------------------------------------------- hosting

    def support_limit(self, preset: str) -> int:
        """Largest support-set size a visitor may ask of ``preset``: the owner's cap and,
        on ZeroGPU, the largest whose build of one category fits in one GPU call of at
        most ``hosting.gpu_max_seconds`` (estimated from the preset's settings)."""
        limit = self.max_support
        if self.hosting.zero_gpu:
            from demo.hosting import max_support_for
            from ovdiff_core.backends.presets import PRESETS as PRESET_CONFIGS

            config = PRESET_CONFIGS[preset].generation
            fits = max_support_for(config, self.hosting.gpu_max_seconds)
            limit = min(limit, fits)
        return max(SUPPORT_SIZE_MIN, limit)

    def start(self, preload: bool = False) -> threading.Thread | None:
        """Get the app ready before visitors come.

        Args:
            preload: load every offered preset's models now (ZeroGPU's practice: load
                at start-up, outside GPU calls) instead of on first use.

        Returns:
            the background thread building ``hosting.prebuild`` (None when there are no
            such names), so that cached categories are ready when the page opens.
        """
        if preload:
            for preset in self.hosting.presets:
                self.pool.get(preset, None)
        if not self.hosting.prebuild:
            return None
        thread = threading.Thread(target=self._prebuild, name="ovdiff-prebuild", daemon=True)
        thread.start()
        return thread

    def _prebuild(self) -> None:
        preset = self.hosting.presets[0]
        for name in self.hosting.prebuild:
            try:
                with self.generation:
                    for _ in self.build_class_gpu(preset, None, name, None):
                        pass
                log.info("prebuilt %r (%s preset)", name, preset)
            except Exception as err:  # a start-up helper: report and go on
                log.warning("could not prebuild %r: %s", name, err)

    def class_seconds(
        self, preset: str, size: int | None, name: str, stuff: bool | None = None
    ) -> int:
        """GPU seconds for :meth:`build_class` of ``name`` (ZeroGPU's dynamic duration)."""
        model = self.pool.get(preset, size)
        try:
            cached = model.is_cached(name)
        except ValueError:
            cached = False
        generator = model.generator
        config = getattr(generator, "config", None)
        n_images = size or int(getattr(config, "n_images", getattr(generator, "n_images", 8)))
        seconds = build_seconds(config, n_images, cached=cached)
        return min(seconds, self.hosting.gpu_max_seconds)

    def segment_seconds(self, upload: Any, session: Session) -> int:
        """GPU seconds for :meth:`segment` of ``upload`` with ``session``'s preset (ZeroGPU's
        dynamic duration): the number of views the image's size gives times extractors."""
        from ovdiff_core.segment import processed_size, view_boxes

        model = self.pool.get(session.preset or self.hosting.presets[0], session.support_size)
        try:
            with Image.open(upload) as im:  # header only: the pixels are decoded later
                width, height = im.size
        except (OSError, ValueError, TypeError, AttributeError):
            width = height = MAX_SIDE
        scale = min(1.0, MAX_SIDE / max(width, height, 1))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        cfg = model.segment_config
        views = len(view_boxes(processed_size(size, cfg.short_side), cfg))
        seconds = segment_seconds(views, len(model.extractors))
        return min(seconds, self.hosting.gpu_max_seconds)

    def own_photos_seconds(self, name: str, stuff: bool, preset: str, session: Session) -> int:
        """GPU seconds for :meth:`create_category`: one UNet pass and features per photo."""
        return min(15 + 3 * len(session.photos), self.hosting.gpu_max_seconds)

    def forget_session(self, request: gr.Request) -> None:
        """Drop everything Gradio keeps for a visitor who closed or reloaded the page."""
        holder = getattr(self.blocks, "state_holder", None)
        key = getattr(request, "session_hash", None)
        if holder is None or key is None:
            return
        holder.delete_state(key)  # our gr.State values (session, segmentation)
        with holder.lock:  # and Gradio's own per-session copy of component values
            holder.session_data.pop(key, None)
            holder.time_last_used.pop(key, None)

    def build_class(
        self, preset: str, size: int | None, name: str, stuff: bool | None
    ) -> Iterator[BuildProgress]:
        """Build (or load) one category: the unit of GPU work.

        On ZeroGPU this runs as one GPU call per category (wrapped in ``__init__`` with
        :func:`demo.hosting.gpu` and the dynamic duration :meth:`class_seconds`); it takes
        and returns only picklable values, as ZeroGPU's worker process needs.
        """
        yield from self.pool.get(preset, size).build_iter(name, stuff=stuff)


# --------------------------------------------------------------------------- the page


def build_demo(
    model_factory: ModelFactory,
    backend: str = "real",
    info: BackendInfo | None = None,
    default_preset: str = "cpu",
    hosting: HostingConfig | None = None,
) -> gr.Blocks:
    """The whole app as a ``gr.Blocks`` (not launched; theme and CSS go to ``launch()``).

    Args:
        model_factory: (preset, support-set size) -> OVDiff (see :mod:`demo.models`).
        backend: ``"real"``, ``"tiny"`` or ``"color"``; sets the banner and examples.
        info: override of :func:`demo.models.backend_info` (tests).
        default_preset: the preset selected on load (if ``hosting`` offers it).
        hosting: presets offered, limits, session lifetime (default: all presets, no
            Space limits; see :mod:`demo.hosting`).
    """
    info = info or backend_info(backend)
    hosting = hosting or HostingConfig(zero_gpu=False)
    app = DemoApp(model_factory, info, hosting)
    if default_preset not in hosting.presets:
        default_preset = hosting.presets[0]
    first_names = split_names_leniently(info.default_names)
    ui = UI()
    ttl = hosting.session_ttl

    # Gradio's own temporary files (uploads, rendered images) are deleted once they are
    # `temp_max_age` seconds old, checked as often.
    with gr.Blocks(title=TITLE, delete_cache=(hosting.temp_max_age, hosting.temp_max_age)) as demo:
        # A visitor's data lives until `session_ttl` seconds after their last action, or
        # until they close the page (`demo.unload` below), whichever comes first.
        ui.session = gr.State(Session(), time_to_live=ttl)
        ui.seg_state = gr.State(None, time_to_live=ttl)  # demo.state.SegState
        ui.typed_names = gr.State(first_names, time_to_live=ttl)
        ui.region_picks = gr.State([], time_to_live=ttl)  # what the gallery tiles point at
        ui.top_picks = gr.State([], time_to_live=ttl)
        ui.atlas_picks = gr.State([], time_to_live=ttl)
        ui.clicked = gr.State(None, time_to_live=ttl)  # [x, y] of the last traced click
        ui.pick = gr.State(None, time_to_live=ttl)  # the item the what-if buttons act on

        gr.Markdown(f"# {TITLE}\n{SUBTITLE}")
        if info.banner:
            gr.Markdown(info.banner, elem_id="mode-banner")
        with gr.Tabs():
            with gr.Tab("1 · Categories", id="categories"):
                tab_build.layout(ui, app, default_preset, first_names)
            with gr.Tab("2 · Your own support images", id="own"):
                tab_photos.layout(ui)
            with gr.Tab("3 · Segment & trace", id="segment"):
                tab_segment.layout(ui, app)
                panel_whatif.layout(ui)
            with gr.Tab("4 · How it works", id="how"):
                tab_how.layout(ui)

        tab_build.wire(ui, app.tab_build)
        tab_photos.wire(ui, app.tab_photos)
        tab_segment.wire(ui, app.tab_segment)
        panel_whatif.wire(ui, app.whatif)
        tab_how.wire(ui, app.tab_how)
        # Closing or reloading the page frees what the visitor left behind at once
        # (Gradio alone would keep it for another hour).
        demo.unload(app.forget_session)

    demo.queue(default_concurrency_limit=2)
    demo.ovdiff_app = app  # handlers, for tests and scripts
    demo.ovdiff_ui = ui  # components by name, for tests
    app.blocks = demo
    return demo
