"""OVDiff Explorer: build categories, segment a photo, click a pixel to see why.

Reads top to bottom: constants, per-visitor state, the model pool, small typed helpers,
thin handlers (methods of :class:`DemoApp`, testable without a browser), the
``gr.Blocks`` layout and, at the end, the wiring. Every number on screen comes from
``ovdiff_core``; the UI never reimplements the algorithm, and clicking a pixel runs no
model (:func:`ovdiff_core.trace` only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
from PIL import Image

from demo import render
from demo.hosting import HostingConfig, build_seconds, gpu, segment_seconds
from demo.inputs import (
    MAX_CATEGORIES,
    MAX_SIDE,
    array_to_rgb,
    bounded_number,
    click_point,
    load_image,
    load_upload,
    mask_from_editor,
    parse_category_names,
    split_names_leniently,
)
from demo.models import (
    BackendInfo,
    ModelFactory,
    ModelPool,
    OwnPhotoSupport,
    backend_info,
)
from ovdiff_core.pipeline import BuildProgress, OVDiff, clean_category_name
from ovdiff_core.segment import Segmentation, segment
from ovdiff_core.stuff import is_stuff
from ovdiff_core.trace import PixelTrace, trace
from ovdiff_core.types import Category, PrototypeKind, SupportSet

__all__ = ["CSS", "MARKER_JS", "DemoApp", "Session", "build_demo"]

# --------------------------------------------------------------------------- constants

TITLE = "OVDiff Explorer"
SUBTITLE = (
    "Open-vocabulary segmentation with diffusion-made prototypes "
    "([OVDiff, ECCV 2024](https://arxiv.org/abs/2306.09316)): a text-to-image model draws "
    "*support images* of every category name, their features become *prototypes*, and "
    "each pixel of your photo takes the label of its most similar prototype. "
    "Click any pixel of the result to see which support images it matched."
)
SUPPORT_SIZE_MIN, SUPPORT_SIZE_MAX = 2, 64
MAX_GALLERY = 240  # support tiles kept in the build gallery (the latest ones)
MAX_REGION_TILES = 12  # support regions shown for one traced prototype
TILE_MAX_BYTES = 256 * 1024**2  # support tiles on disk (least recently used deleted beyond)
TILE_MAX_FILES = 2000
SIMILARITY_SIDE = 384  # long side of the traced prototype's similarity preview, pixels
KIND_NAMES = {
    PrototypeKind.CLASS: "class-level",
    PrototypeKind.INSTANCE: "instance-level",
    PrototypeKind.PART: "part-level",
}
CSS = """
#mode-banner { background: #fff4d6; border: 1px solid #e0a800; border-radius: 8px;
               padding: 4px 14px; }
.ovd-legend { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 15px; }
.ovd-legend-item { white-space: nowrap; }
.ovd-swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
              margin-right: 6px; vertical-align: -2px; border: 1px solid rgba(0,0,0,.35); }
.ovd-prefilter { margin-top: 8px; font-size: 14px; }
.ovd-trace h3 { margin: 0 0 6px 0; }
.ovd-trace table { font-size: 14px; }
#ovd-marker { position: absolute; width: 16px; height: 16px; margin: -8px 0 0 -8px;
              border: 2px solid #fff; border-radius: 50%; box-shadow: 0 0 0 2px #000;
              pointer-events: none; z-index: 10; }
"""
# Marks the clicked point on the segmentation in the browser at once (no round trip, no
# re-sent image); the marker disappears when a new segmentation image loads.
MARKER_JS = """
() => {
  const marker = () => {
    let m = document.getElementById('ovd-marker');
    if (!m) { m = document.createElement('div'); m.id = 'ovd-marker'; }
    return m;
  };
  document.addEventListener('click', (e) => {
    const img = e.target instanceof Element ? e.target.closest('#overlay img') : null;
    if (!img || !img.parentElement || !img.naturalWidth) return;
    // the picture inside the <img> box: scaled down to fit (never up), centred
    const r = img.getBoundingClientRect();
    const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight, 1);
    const dx = (r.width - img.naturalWidth * s) / 2, dy = (r.height - img.naturalHeight * s) / 2;
    if (e.clientX < r.left + dx || e.clientX >= r.right - dx ||
        e.clientY < r.top + dy || e.clientY >= r.bottom - dy) return;
    const box = img.parentElement;
    if (getComputedStyle(box).position === 'static') box.style.position = 'relative';
    const m = marker();
    if (m.parentElement !== box) box.appendChild(m);
    const b = box.getBoundingClientRect();
    m.style.left = (e.clientX - b.left) + 'px';
    m.style.top = (e.clientY - b.top) + 'px';
    m.style.display = 'block';
  }, true);
  document.addEventListener('load', (e) => {
    if (e.target instanceof Element && e.target.matches('#overlay img')) {
      const m = document.getElementById('ovd-marker');
      if (m) m.style.display = 'none';
    }
  }, true);
}
"""

T = TypeVar("T")
log = logging.getLogger("ovdiff.demo")


# --------------------------------------------------------------------------- state


@dataclass
class Session:
    """One visitor's data (``gr.State``): their categories and pending own photos.

    Attributes:
        preset: the preset every category in ``categories`` was built with.
        support_size: support-set size of the last build.
        categories: ``{name: Category}`` this visitor built, in build order. Banks are
            shared with other visitors through the model and the on-disk cache; the
            thing/stuff flag is the visitor's own.
        photos: own support photos waiting to become a category: ((H, W, 3) uint8,
            (H, W) bool painted foreground or None).
    """

    preset: str | None = None
    support_size: int | None = None
    categories: dict[str, Category] = field(default_factory=dict)
    photos: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)


def _upload_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` upload that reaches the handler as the raw file path, unopened.

    Gradio's own preprocessing opens the file with PIL and fails with a bare "Error" on
    non-images; passing the path through lets :func:`demo.inputs.load_image` explain.
    (An instance override rather than a subclass: Gradio writes a ``.pyi`` stub next to
    the module of every component subclass.)
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    default = image.preprocess

    def preprocess(payload: Any) -> Any:
        path = getattr(payload, "path", None)
        url = str(getattr(payload, "url", "") or "")
        if path and not url.startswith("data:"):
            return str(path)
        return default(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


# --------------------------------------------------------------------------- helpers


def _checked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; turn its ValueError into a ``gr.Error`` pop-up with the same message
    (escaped: pop-ups render HTML, and messages may echo names or file names)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise gr.Error(render.esc(err)) from None


def _warn_all(notes: Sequence[str]) -> None:
    for note in notes:
        gr.Warning(render.esc(note))


def _check_category_limit(session: Session, names: Sequence[str], preset: str | None) -> None:
    """Refuse names that would take the visitor's session past ``MAX_CATEGORIES``.

    Counts the session's categories (all builds and own photos so far) plus the new
    names; rebuilding a name already there does not count twice. A preset change drops
    the session's categories (see ``DemoApp._build``), so then only the new names count.
    """
    kept = session.categories if session.preset in (None, preset) else {}
    new = [n for n in dict.fromkeys(names) if n not in kept]
    total = len(kept) + len(new)
    if total > MAX_CATEGORIES:
        raise gr.Error(
            f"You have {len(kept)} categories already and this adds {len(new)} new ones: "
            f"{total} is over the limit of {MAX_CATEGORIES} per visitor. Name fewer new "
            "categories (rebuilding one you have is free), or reload the page to start a "
            "new session without any."
        )


class _TileStore:
    """Writes rendered tiles once to a temporary folder; galleries then pass file paths.

    Galleries re-send every item on each streamed update; paths avoid re-encoding them.
    The folder is bounded: beyond ``max_files`` tiles or ``max_bytes`` bytes the least
    recently used tiles are deleted, but never the ``keep_latest`` most recently used (the
    gallery of the build in progress shows at most :data:`MAX_GALLERY` of them).

    Args:
        root: the folder (default: a new temporary folder).
        max_bytes: byte budget of the tiles (default 256 MiB).
        max_files: most tiles kept (default 2,000).
        keep_latest: tiles never evicted, the most recently used first.
    """

    def __init__(
        self,
        root: Path | None = None,
        max_bytes: int = TILE_MAX_BYTES,
        max_files: int = TILE_MAX_FILES,
        keep_latest: int = MAX_GALLERY,
    ) -> None:
        self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="ovdiff-demo-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_files, self.keep_latest = max_bytes, max_files, keep_latest
        self._used: OrderedDict[Path, int] = OrderedDict()  # tile -> bytes, least recent first
        self._bytes = 0
        self._lock = threading.Lock()

    def save(self, image: np.ndarray) -> str:
        """Path of a PNG of ``image`` ((H, W, 3) uint8), written unless already there."""
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:20]
        path = self.root / f"{digest}-{image.shape[0]}x{image.shape[1]}.png"
        with self._lock:
            if path in self._used and path.exists():
                self._used.move_to_end(path)
                return str(path)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp.png")
        Image.fromarray(image).save(tmp, optimize=False, compress_level=1)
        tmp.replace(path)
        with self._lock:
            self._bytes -= self._used.pop(path, 0)
            self._used[path] = path.stat().st_size
            self._bytes += self._used[path]
            self._evict()
        return str(path)

    def _evict(self) -> None:
        while len(self._used) > self.keep_latest and (
            len(self._used) > self.max_files or self._bytes > self.max_bytes
        ):
            old, size = self._used.popitem(last=False)
            self._bytes -= size
            old.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        """Bytes of the tiles kept."""
        with self._lock:
            return self._bytes


def _build_size(support_size: Any) -> int | None:
    """The support-set size a build asks for (None: the preset's), checked: a ``gr.Error``
    for NaN, infinities, non-numbers and values outside the slider's range."""
    if support_size is None or support_size == "" or support_size == 0:
        return None
    return _checked(
        bounded_number, support_size, "Support-set size", SUPPORT_SIZE_MIN, SUPPORT_SIZE_MAX
    )


def _support_caption(support: SupportSet, i: int, offset: int, cached: bool) -> str:
    fg = 100.0 * float(support.foreground[i].mean())
    bg = 100.0 * float(support.background[i].mean())
    tag = " · cached" if cached else ""
    return f"{support.category} #{offset + i + 1} · fg {fg:.0f}% · bg {bg:.0f}%{tag}"


def _category_summary(cat: Category) -> str:
    sizes = ", ".join(f"{render.md(name)}: {len(b)}" for name, b in cat.banks.items())
    n = len(cat.support) if cat.support is not None else 0
    kind = "stuff" if cat.stuff else "thing"
    return (
        f"**{render.md(cat.name)}** ({kind}) · {n} support images · "
        f"prototypes per extractor: {sizes}"
    )


def _prototype_label(seg: Segmentation, tr: PixelTrace) -> str:
    w = tr.winner
    if w is None:
        return "none (this label had no prototypes)"
    side = "foreground" if w.foreground else "background"
    where = f", support image #{w.image_index + 1}" if w.image_index >= 0 else ""
    return (
        f"<b>{render.esc(w.category)}</b> · {side} · {KIND_NAMES[w.kind]} prototype "
        f"#{w.index}{where} (extractor <code>{render.esc(w.extractor)}</code>)"
    )


def _trace_html(seg: Segmentation, tr: PixelTrace) -> str:
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
    return (
        f'<div class="ovd-trace" data-x="{tr.x}" data-y="{tr.y}" data-label="{label}">'
        f"<h3>Pixel (x={tr.x}, y={tr.y}) → {label}</h3>"
        f"<p>Score <b>{tr.score:.3f}</b>. Winning prototype: {_prototype_label(seg, tr)}; it "
        f"supplies {tr.winner_share:.3f} of the score ({share:.0f}%), mean cosine "
        f"{tr.winner_cosine:.3f}. {region_text}</p>"
        f"<details><summary>All scores at this pixel</summary><table>{rows}</table></details>"
        "</div>"
    )


def _explain_settings(support: SupportSet | None) -> str:
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


# --------------------------------------------------------------------------- handlers


def _page_progress(progress: Callable[..., Any]) -> Callable[[str, float | None, str], None]:
    """Adapt a ``gr.Progress``-like callable to the model loaders' progress hook
    ``(stage, fraction, message)``: shows ``message`` with ``fraction`` in the page
    (``fraction`` None: a message without a bar position)."""

    def hook(stage: str, fraction: float | None, message: str) -> None:
        progress(fraction, desc=message)

    return hook


class DemoApp:
    """The demo's handlers, one method per UI action (thin wrappers over ``ovdiff_core``).

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
        self._build_class_gpu = gpu(self.class_seconds)(self.build_class)
        self.tiles = _TileStore(max_bytes=self.hosting.tiles_max_mb * 2**20)
        # by id() of the pool's models: (the model, kept alive while held, its maker)
        self._own: dict[int, tuple[OVDiff, OwnPhotoSupport]] = {}
        self._own_lock = threading.Lock()

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
                    for _ in self._build_class_gpu(preset, None, name, None):
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

    # ---------------------------------------------------------------- tab 1: categories

    def ready_set(self, label: str | None) -> str:
        """Text of a ready-made category set (empty for an unknown label)."""
        return self.info.ready_sets.get(label or "", "")

    def stuff_choices(
        self, text: str, selected: list[str] | None, previous: list[str] | None
    ) -> tuple[dict[str, Any], list[str]]:
        """Thing/stuff toggle for the typed names: keeps the visitor's choices, prefills new
        names from the built-in table. Returns (CheckboxGroup update, names now listed)."""
        names = split_names_leniently(text)
        selected_set = set(selected or [])
        known = set(previous or [])
        value = [n for n in names if n in selected_set or (n not in known and is_stuff(n))]
        return gr.update(choices=names, value=value), names

    def check_build(
        self,
        names_text: str,
        preset: str,
        support_size: float | None,
        session: Session | None = None,
    ) -> None:
        """Raise ``gr.Error`` for what :meth:`build` would refuse (no side effects).

        With ``session``, also refuse names that would take the visitor past
        ``MAX_CATEGORIES`` categories in all (see :func:`_check_category_limit`).
        """
        names = _checked(parse_category_names, names_text)
        if preset not in self.hosting.presets:
            raise gr.Error(f"Choose a preset ({', '.join(self.hosting.presets)}).")
        size = _build_size(support_size)
        limit = self.support_limit(preset)
        if size is not None and size > limit:
            why = "one GPU call" if self.hosting.zero_gpu else "this server"
            raise gr.Error(
                f"Support-set size is at most {limit} for the '{preset}' preset on {why}; "
                "choose a smaller size."
            )
        if session is not None:
            _check_category_limit(session, names, preset)

    def build(
        self,
        names_text: str,
        stuff_names: list[str] | None,
        preset: str,
        support_size: float | None,
        session: Session,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's convention
    ) -> Iterator[tuple[list[tuple[str, str]], str, Session, dict[str, Any]]]:
        """Build (or load) every typed category, streaming support images as they arrive.

        Yields:
            (gallery items, status Markdown, session, How-it-works category update) after
            each support batch and when each category is done.
        """
        self.check_build(names_text, preset, support_size, session)
        names = parse_category_names(names_text)
        size = _build_size(support_size)
        yield from self._build(names, set(stuff_names or []), preset, size, session, progress)

    def _build(
        self,
        names: list[str],
        stuff: set[str],
        preset: str,
        size: int | None,
        session: Session,
        progress: gr.Progress,
    ) -> Iterator[tuple[list[tuple[str, str]], str, Session, dict[str, Any]]]:
        model = self.model(preset, size, progress=progress)
        if session.preset is not None and session.preset != preset and session.categories:
            gone = [n for n in session.categories if n not in names]
            if gone:
                gr.Warning(
                    render.esc(
                        f"Preset changed to '{preset}': removed {', '.join(gone)} (built with "
                        f"'{session.preset}'); build them again to use them."
                    )
                )
            session.categories = {}
        session.preset, session.support_size = preset, size
        tiles: list[tuple[str, str]] = []
        lines: list[str] = []
        per_class = size or 0
        warned = False
        for k, name in enumerate(names):
            progress(k / len(names), desc=f"{name}: starting")
            shown = render.md(name)  # the name as literal Markdown text
            status = f"**{shown}**: checking the cache..."
            yield tiles[-MAX_GALLERY:], "\n\n".join([*lines, status]), session, gr.update()
            try:
                offset = 0
                result: Category | None = None
                cached = unsaved = False
                # Files present: most likely served from the cache, so no generation turn
                # (the UNet itself is still used by one capture at a time).
                likely_cached = model.is_cached(name)
                steps = self._class_steps(likely_cached, preset, size, name, name in stuff)
                for ev in steps:
                    if isinstance(ev, str):  # waiting for another visitor's generation
                        yield (
                            tiles[-MAX_GALLERY:],
                            "\n\n".join([*lines, f"**{name}**: {ev}"]),
                            session,
                            gr.update(),
                        )
                        continue
                    if ev.warning:  # built, but the cache write failed: say so once a build
                        unsaved = True
                        if not warned:
                            gr.Warning(ev.warning)
                            warned = True
                    total = ev.total or per_class or max(ev.done, 1)
                    if ev.stage == "support" and ev.batch is not None:
                        batch = ev.batch
                        for i in range(len(batch)):
                            tile = render.support_tile(
                                batch.images[i],
                                batch.attributions[i],
                                batch.foreground[i],
                                batch.background[i],
                            )
                            caption = _support_caption(batch, i, offset, ev.cached)
                            tiles.append((self.tiles.save(tile), caption))
                        offset += len(batch)
                        verb = "loaded from the cache" if ev.cached else "generated"
                        status = f"**{shown}**: {ev.done}/{total} support images {verb}..."
                        progress(
                            (k + 0.9 * min(ev.done / total, 1.0)) / len(names),
                            desc=f"{name}: {ev.done}/{total} support images",
                        )
                    elif ev.stage == "bank":
                        status = f"**{shown}**: prototypes of extractor `{ev.extractor}` ready"
                    elif ev.stage == "done":
                        result = ev.category_result
                        cached = ev.cached  # only if support and every bank came from the cache
                        continue
                    yield (
                        tiles[-MAX_GALLERY:],
                        "\n\n".join([*lines, status]),
                        session,
                        gr.update(),
                    )
            except (ValueError, RuntimeError, OSError) as err:
                raise gr.Error(render.esc(f"Building '{name}' failed: {err}")) from None
            if result is None:
                raise gr.Error(render.esc(f"Building '{name}' ended without a category."))
            session.categories.pop(name, None)
            session.categories[name] = result
            tag = " (cached ✓)" if cached else ""
            tag += " (not saved to the cache)" if unsaved else ""
            lines.append(_category_summary(result) + tag)
            yield tiles[-MAX_GALLERY:], "\n\n".join(lines), session, self._category_update(session)
        progress(1.0, desc="done")
        plural = "category" if len(names) == 1 else "categories"
        done = f"Ready: {len(names)} {plural}. Segment an image in tab 3."
        yield (
            tiles[-MAX_GALLERY:],
            "\n\n".join([*lines, done]),
            session,
            self._category_update(session),
        )

    def _class_steps(
        self, cached: bool, preset: str, size: int | None, name: str, stuff: bool
    ) -> Iterator[str | BuildProgress]:
        """The build events of one category, preceded, when it must be generated, by a
        status line each second while another build holds this process's generation
        turn. The turn is released when the events end, fail or are abandoned."""
        with contextlib.ExitStack() as turn:
            if not cached:
                waited = 0
                while not self.generation.acquire(timeout=1.0):
                    waited += 1
                    yield f"waiting for another visitor's build to finish ({waited} s)..."
                turn.callback(self.generation.release)
            yield from self._build_class_gpu(preset, size, name, stuff)

    def build_class(
        self, preset: str, size: int | None, name: str, stuff: bool | None
    ) -> Iterator[BuildProgress]:
        """Build (or load) one category: the unit of GPU work.

        On ZeroGPU this runs as one GPU call per category (wrapped in ``__init__`` with
        :func:`demo.hosting.gpu` and the dynamic duration :meth:`class_seconds`); it takes
        and returns only picklable values, as ZeroGPU's worker process needs.
        """
        yield from self.pool.get(preset, size).build_iter(name, stuff=stuff)

    @staticmethod
    def _category_update(session: Session) -> dict[str, Any]:
        names = list(session.categories)
        return gr.update(choices=names, value=names[-1] if names else None)

    # ---------------------------------------------------------------- tab 2: own photos

    def add_photo(
        self, editor: dict[str, Any] | None, session: Session
    ) -> tuple[list[tuple[np.ndarray, str]], str, Session]:
        """Queue the photo in the editor (and its painted foreground) for a new category."""
        if not isinstance(editor, dict) or editor.get("background") is None:
            raise gr.Error(
                "Upload a photo into the editor first (then optionally paint the object)."
            )
        notes: list[str] = []
        photo = _checked(array_to_rgb, np.asarray(editor["background"]), notes)
        loaded = _checked(load_image, photo)
        _warn_all(notes + loaded.notes)
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
        return self._photo_gallery(session), status, session

    @staticmethod
    def _photo_gallery(session: Session) -> list[tuple[np.ndarray, str]]:
        out = []
        for i, (img, mask) in enumerate(session.photos, start=1):
            if mask is None:
                out.append((img, f"photo {i} · no mask"))
            else:
                out.append((render.highlight_region(img, mask, min_side=1), f"photo {i} · painted"))
        return out

    def clear_photos(self, session: Session) -> tuple[list[Any], str, Session]:
        session.photos = []
        return [], "No photos queued.", session

    def create_category(
        self,
        name: str,
        stuff: bool,
        preset: str,
        session: Session,
    ) -> tuple[str, Session, list[Any], dict[str, Any]]:
        """Turn the queued photos into a category (in-context mode, ``OVDiff.add_support``)."""
        clean = _checked(clean_category_name, name or "")
        if not session.photos:
            raise gr.Error("No photos queued: upload a photo and press 'Add photo' first.")
        _check_category_limit(session, [clean], preset)
        model = self.model(preset, session.support_size)
        if not self.generation.acquire(blocking=False):
            raise gr.Error("A build is already running; wait for it to finish, then try again.")
        try:
            support = _checked(self.own_photos(model), clean, session.photos)
            events = list(model.add_support_iter(support, stuff=bool(stuff)))
            cat = events[-1].category_result
            if cat is None:
                raise RuntimeError("the build ended without a category")
        except (ValueError, RuntimeError, OSError) as err:
            message = f"Could not make '{clean}' from your photos: {err}"
            raise gr.Error(render.esc(message)) from None
        finally:
            self.generation.release()
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
        status = _category_summary(cat) + f" (from your photos){note}. Segment an image in tab 3."
        return status, session, [], self._category_update(session)

    # ---------------------------------------------------------------- tab 3: segment

    def check_segment(self, upload: Any, session: Session) -> None:
        """Raise ``gr.Error`` for what :meth:`segment` would refuse (no side effects)."""
        if not session.categories:
            raise gr.Error("No categories yet: build some in tab 1 (or from your photos in tab 2).")
        _checked(load_upload, upload, MAX_SIDE)  # kept: segment() does not decode again

    def segment(
        self, upload: Any, session: Session
    ) -> tuple[np.ndarray, str, Segmentation, str, Any, None, list[Any], list[Any]]:
        """Segment the uploaded image into the visitor's categories.

        Returns:
            overlay, legend HTML, the segmentation (state), then cleared trace outputs
            (info, plot, similarity map, regions) and cleared score maps.
        """
        loaded = _checked(load_upload, upload, MAX_SIDE)
        _warn_all(loaded.notes)
        if not session.categories:
            raise gr.Error("No categories yet: build some in tab 1 (or from your photos in tab 2).")
        model = self.model(session.preset, session.support_size)
        cats = list(session.categories.values())
        try:
            seg = segment(loaded.image, cats, model.extractors, model.segment_config, model.scorer)
        except ValueError as err:
            raise gr.Error(render.esc(f"Segmentation failed: {err}")) from None
        overlay = render.overlay_labels(seg.image, seg.labels)
        stuff = {c.name: c.stuff for c in cats}
        legend = render.legend_html(seg.class_names, seg.prefilter, seg.queried, stuff)
        hint = "<p><i>Click any pixel of the segmentation to trace its label.</i></p>"
        return overlay, legend, seg, hint, render.empty_scores_figure(), None, [], []

    def score_maps(self, seg: Segmentation | None) -> list[tuple[np.ndarray, str]]:
        """Every label's score map (background first), as heatmaps with captions."""
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

    # ---------------------------------------------------------------- trace

    def trace_panel(
        self, seg: Segmentation | None, index: Sequence[Any] | None
    ) -> tuple[str, np.ndarray, list[tuple[np.ndarray, str]]]:
        """Explain the clicked pixel: runs :func:`ovdiff_core.trace`, no model.

        Args:
            seg: the visitor's segmentation (None before segmenting).
            index: the click, [x, y] in the segmented image's pixels.

        Returns:
            (trace HTML, the winning prototype's similarity map with the point marked
            (long side <= ``SIMILARITY_SIDE``), highlighted support regions). The
            browser marks the point on the segmentation itself (``MARKER_JS``), so the
            large overlay is not re-sent.
        """
        x, y = _checked(click_point, index, seg.size if seg is not None else None)
        assert seg is not None  # click_point raised otherwise
        tr = trace(seg, x, y)
        color = render.class_color(tr.label)
        sim = render.similarity_overlay(
            seg.image, tr.similarity_map, point=(x, y), max_side=SIMILARITY_SIDE
        )
        regions = []
        owner = tr.winner.category if tr.winner else ""
        for reg in tr.regions[:MAX_REGION_TILES]:
            if reg.image is None:
                continue
            tile = render.highlight_region(reg.image, reg.mask, color=color, min_side=128)
            regions.append((tile, f"{owner} support #{reg.image_index + 1}"))
        return _trace_html(seg, tr), sim, regions

    def trace_chart(self, seg: Segmentation | None, index: Sequence[Any] | None) -> Any:
        """Plotly bar chart of every label's score at the clicked pixel (background first).

        The bars are ``seg.scores_at(x, y)``, the numbers :func:`ovdiff_core.trace`
        reports as ``class_scores``; read directly so that this chart, the costliest
        part of the panel for a browser to draw, is computed in a parallel call.
        """
        x, y = _checked(click_point, index, seg.size if seg is not None else None)
        assert seg is not None
        at = seg.scores_at(x, y)
        scores = {n: float(at[k]) for k, n in enumerate(seg.class_names)}
        label = seg.class_names[int(seg.labels[y, x])]
        return render.scores_figure(scores, seg.class_names, label, point=(x, y))

    def trace_at(
        self, seg: Segmentation | None, index: Sequence[Any] | None
    ) -> tuple[str, Any, np.ndarray, list[tuple[np.ndarray, str]]]:
        """:meth:`trace_panel` and :meth:`trace_chart` in one call:
        (trace HTML, bar chart, similarity map, support regions)."""
        html, sim, regions = self.trace_panel(seg, index)
        return html, self.trace_chart(seg, index), sim, regions

    def trace_click(
        self, seg: Segmentation | None, evt: gr.SelectData
    ) -> tuple[str, np.ndarray, list[tuple[np.ndarray, str]]]:
        return self.trace_panel(seg, evt.index)

    def chart_click(self, seg: Segmentation | None, evt: gr.SelectData) -> Any:
        return self.trace_chart(seg, evt.index)

    # ---------------------------------------------------------------- tab 4: how it works

    def explain(
        self,
        session: Session,
        seg: Segmentation | None,
        name: str | None,
        image_index: float | None,
    ) -> tuple[
        str,
        np.ndarray | None,
        np.ndarray | None,
        np.ndarray | None,
        np.ndarray | None,
        str,
        Any,
        list[tuple[np.ndarray, str]],
        np.ndarray | None,
        dict[str, Any],
    ]:
        """The pipeline's real intermediate data for one category and support image.

        Returns:
            settings Markdown, support image, attribution map, masks, part clusters,
            cluster caption, PCA scatter of all prototypes, score maps of the current
            segmentation, its argmax overlay, and an update of the image slider.
        """
        if not session.categories:
            raise gr.Error("Build at least one category first (tab 1), then come back here.")
        cat = session.categories.get(name or "") or next(reversed(session.categories.values()))
        support = cat.support
        extractor = next(iter(cat.banks))
        bank = cat.banks[extractor]
        n = len(support) if support is not None else 0
        last = max(n - 1, 0)
        if image_index is None or image_index == "":
            image_index = 0
        try:  # NaN, infinities and non-numbers are refused; finite numbers are clamped
            _checked(bounded_number, image_index, "Support image index", -(2**31), 2**31)
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
            maps = self.score_maps(seg)
            argmax = render.overlay_labels(seg.image, seg.labels)
        slider = gr.update(maximum=max(n - 1, 1), value=i)
        return (
            _explain_settings(support),
            photo,
            attribution,
            masks,
            clusters,
            caption,
            fig,
            maps,
            argmax,
            slider,
        )


# --------------------------------------------------------------------------- layout


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

    # Gradio's own temporary files (uploads, rendered images) are deleted once they are
    # `temp_max_age` seconds old, checked as often.
    with gr.Blocks(title=TITLE, delete_cache=(hosting.temp_max_age, hosting.temp_max_age)) as demo:
        # A visitor's data lives until `session_ttl` seconds after their last action, or
        # until they close the page (`demo.unload` below), whichever comes first.
        session = gr.State(Session(), time_to_live=hosting.session_ttl)
        seg_state = gr.State(None, time_to_live=hosting.session_ttl)
        typed_names = gr.State(first_names, time_to_live=hosting.session_ttl)

        gr.Markdown(f"# {TITLE}\n{SUBTITLE}")
        if info.banner:
            gr.Markdown(info.banner, elem_id="mode-banner")

        with gr.Tabs():
            # ---------------------------------------------------------------- tab 1
            with gr.Tab("1 · Categories", id="categories"):
                with gr.Row():
                    names_box = gr.Textbox(
                        value=info.default_names,
                        label=f"Category names (comma-separated, at most {MAX_CATEGORIES})",
                        placeholder="cat, sofa, lamp",
                        elem_id="names",
                        scale=3,
                    )
                    ready = gr.Dropdown(
                        choices=list(info.ready_sets),
                        value=None,
                        label="Ready-made sets",
                        elem_id="ready-sets",
                        scale=1,
                    )
                stuff_box = gr.CheckboxGroup(
                    choices=first_names,
                    value=[n for n in first_names if is_stuff(n)],
                    label="Stuff categories (amorphous: sky, grass...): no background "
                    "prototypes, always kept by the pre-filter. Unticked = thing.",
                    elem_id="stuff",
                )
                with gr.Row():
                    preset = gr.Radio(
                        choices=list(hosting.presets),
                        value=default_preset,
                        label="Preset",
                        info="cpu: fast settings for a laptop; paper: the authors' settings "
                        "(needs a GPU)",
                        elem_id="preset",
                    )
                    support_size = gr.Slider(
                        SUPPORT_SIZE_MIN,
                        app.max_support,
                        value=min(info.default_support, app.max_support),
                        step=1,
                        label="Support images per category",
                        elem_id="support-size",
                    )
                build_btn = gr.Button("Build categories", variant="primary", elem_id="build")
                build_status = gr.Markdown(elem_id="build-status")
                support_gallery = gr.Gallery(
                    fit_columns=False,
                    label="Support images. Each tile: photo | attribution map (cross-attention "
                    "to the name) / masks (green = foreground, blue = background) | foreground",
                    columns=3,
                    height=520,
                    elem_id="support-gallery",
                    object_fit="contain",
                )

            # ---------------------------------------------------------------- tab 2
            with gr.Tab("2 · Your own support images", id="own"):
                gr.Markdown(
                    "In-context mode: instead of generated images, use your own photos of a "
                    "category. Upload a photo, paint over the object with the brush (the "
                    "foreground), press **Add photo**; repeat, then **Create category**."
                )
                with gr.Row():
                    with gr.Column():
                        own_name = gr.Textbox(label="Category name", elem_id="own-name")
                        own_stuff = gr.Checkbox(label="stuff (amorphous region)", value=False)
                        editor = gr.ImageEditor(
                            type="numpy",
                            label="Photo (paint the object)",
                            sources=("upload", "clipboard"),
                            transforms=(),
                            layers=False,
                            brush=gr.Brush(colors=["#22dd55"], color_mode="fixed"),
                            elem_id="own-editor",
                        )
                        with gr.Row():
                            add_btn = gr.Button("Add photo", elem_id="own-add")
                            clear_btn = gr.Button("Clear photos")
                        create_btn = gr.Button(
                            "Create category", variant="primary", elem_id="own-create"
                        )
                    with gr.Column():
                        own_status = gr.Markdown("No photos queued.", elem_id="own-status")
                        own_gallery = gr.Gallery(
                            label="Queued photos", columns=3, height=360, fit_columns=False
                        )

            # ---------------------------------------------------------------- tab 3
            with gr.Tab("3 · Segment & trace", id="segment"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = _upload_image(
                            label="Image to segment",
                            sources=["upload", "clipboard"],
                            elem_id="upload",
                            height=320,
                        )
                        if info.examples:
                            gr.Examples(info.examples, inputs=[upload], label="Examples")
                        segment_btn = gr.Button("Segment", variant="primary", elem_id="segment")
                    with gr.Column(scale=2):
                        overlay = gr.Image(
                            label="Segmentation: click a pixel to trace it",
                            interactive=False,
                            elem_id="overlay",
                            height=480,
                            buttons=["download", "fullscreen"],
                        )
                        legend = gr.HTML(elem_id="legend")
                with gr.Accordion("Per-class score maps", open=False):
                    maps_btn = gr.Button("Show score maps", elem_id="show-maps")
                    maps_gallery = gr.Gallery(
                        fit_columns=False,
                        label="Score maps (magma: 0 dark, 1 bright)",
                        columns=4,
                        height=300,
                        elem_id="score-maps",
                    )
                gr.Markdown("### Why this label?")
                trace_info = gr.HTML(
                    "<p><i>Segment an image, then click any pixel of the result.</i></p>",
                    elem_id="trace-info",
                )
                with gr.Row():
                    trace_plot = gr.Plot(
                        render.empty_scores_figure(),
                        label="Score of every label at the clicked pixel",
                        elem_id="trace-plot",
                    )
                    trace_sim = gr.Image(
                        label="Similarity of the winning prototype over the image (point marked)",
                        interactive=False,
                        elem_id="trace-sim",
                        height=300,
                        format="jpeg",
                    )
                trace_regions = gr.Gallery(
                    fit_columns=False,
                    label="Support regions that formed the winning prototype",
                    columns=6,
                    height=240,
                    elem_id="trace-regions",
                    object_fit="contain",
                    format="jpeg",
                )

            # ---------------------------------------------------------------- tab 4
            with gr.Tab("4 · How it works", id="how"):
                gr.Markdown(
                    "The steps of OVDiff on *your* data. Choose a built category and one of "
                    "its support images, then press **Explain**."
                )
                with gr.Row():
                    how_cat = gr.Dropdown(choices=[], label="Category", elem_id="how-category")
                    how_img = gr.Slider(
                        0,
                        SUPPORT_SIZE_MAX - 1,
                        value=0,
                        step=1,
                        label="Support image index",
                        elem_id="how-image",
                    )
                    how_btn = gr.Button("Explain", variant="primary", elem_id="how-explain")
                gr.Markdown(
                    "#### 1 · Prompt → support image\nA text-to-image model draws the "
                    "category name."
                )
                how_settings = gr.Markdown(elem_id="how-settings")
                with gr.Row():
                    how_photo = gr.Image(
                        label="support image", interactive=False, elem_id="how-photo"
                    )
                    how_attr = gr.Image(
                        label="2 · attribution map (cross-attention to the name)",
                        interactive=False,
                        elem_id="how-attribution",
                    )
                    how_masks = gr.Image(
                        label="3 · masks: green foreground, blue background",
                        interactive=False,
                        elem_id="how-masks",
                    )
                    how_parts = gr.Image(
                        label="4 · feature clusters (part prototypes)",
                        interactive=False,
                        elem_id="how-parts",
                    )
                how_parts_caption = gr.Markdown()
                gr.Markdown(
                    "#### 5 · Prototypes\nClass-level (star), instance-level (square) and "
                    "part-level (circle) prototypes of every category; filled = "
                    "foreground, open = background. Nearby points are similar features."
                )
                how_scatter = gr.Plot(label="prototypes, PCA", elem_id="how-scatter")
                gr.Markdown(
                    "#### 6 · Score maps → 7 · argmax\nEach pixel's cosine to the best "
                    "prototype of every label (from tab 3's segmentation), then the "
                    "label with the highest score."
                )
                how_maps = gr.Gallery(
                    columns=4, height=260, label="score maps", elem_id="how-maps", fit_columns=False
                )
                how_argmax = gr.Image(
                    label="argmax = segmentation", interactive=False, elem_id="how-argmax"
                )

        # ------------------------------------------------------------------ wiring
        ready.change(app.ready_set, ready, names_box, queue=False)
        gr.on(
            [names_box.change],
            app.stuff_choices,
            [names_box, stuff_box, typed_names],
            [stuff_box, typed_names],
            queue=False,
            trigger_mode="always_last",
        )
        # Bad input is reported by a quick check with no outputs, so that an error pop-up
        # leaves the gallery and status of the last build untouched.
        build_btn.click(
            app.check_build,
            [names_box, preset, support_size, session],
            None,
            concurrency_limit=None,
            show_progress="hidden",
        ).success(lambda: gr.update(interactive=False), None, build_btn, queue=False).success(
            # Not a GPU call itself: cached categories load at once, and each category
            # that must be generated is one GPU call of its own (DemoApp.build_class).
            # Generation waits for its turn inside the handler, so visitors whose
            # categories are cached never queue behind another visitor's generation.
            app.build,
            [names_box, stuff_box, preset, support_size, session],
            [support_gallery, build_status, session, how_cat],
            concurrency_limit=16,
            concurrency_id="build",
        ).then(lambda: gr.update(interactive=True), None, build_btn, queue=False)

        add_btn.click(app.add_photo, [editor, session], [own_gallery, own_status, session])
        clear_btn.click(app.clear_photos, session, [own_gallery, own_status, session])
        create_btn.click(
            gpu(app.own_photos_seconds)(app.create_category),
            [own_name, own_stuff, preset, session],
            [own_status, session, own_gallery, how_cat],
            concurrency_limit=1,
            concurrency_id="own-photos",
        )

        segment_btn.click(
            app.check_segment,
            [upload, session],
            None,
            concurrency_limit=None,
            show_progress="hidden",
        ).success(
            gpu(app.segment_seconds)(app.segment),
            [upload, session],
            [
                overlay,
                legend,
                seg_state,
                trace_info,
                trace_plot,
                trace_sim,
                trace_regions,
                maps_gallery,
            ],
            concurrency_limit=2,
            concurrency_id="segment",
        )
        maps_btn.click(app.score_maps, seg_state, maps_gallery)
        # A click runs no model: plain HTTP calls (no queue round trips), two in parallel:
        # the text, similarity map and support regions; and the plotly chart, which costs
        # the browser more to draw than all the rest, so the panel does not wait for it.
        for handler, outputs in (
            (app.trace_click, [trace_info, trace_sim, trace_regions]),
            (app.chart_click, [trace_plot]),
        ):
            overlay.select(
                handler,
                seg_state,
                outputs,
                show_progress="hidden",
                queue=False,
                trigger_mode="always_last",
            )

        gr.on(
            [how_btn.click, how_img.release],
            app.explain,
            [session, seg_state, how_cat, how_img],
            [
                how_settings,
                how_photo,
                how_attr,
                how_masks,
                how_parts,
                how_parts_caption,
                how_scatter,
                how_maps,
                how_argmax,
                how_img,
            ],
        )

        # Closing or reloading the page frees what the visitor left behind at once
        # (Gradio alone would keep it for another hour).
        demo.unload(app.forget_session)

    demo.queue(default_concurrency_limit=2)
    demo.ovdiff_app = app  # handlers, for tests and scripts
    app.blocks = demo
    return demo
