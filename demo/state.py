"""What the tabs share: constants, a visitor's state, tile storage, small helpers.

Every tab module (``demo/tab_*.py``) imports from here; nothing here lays out a page.
Handlers return dataclasses whose field names are the names of the components they
update (:class:`UI`), so that adding an output is adding a field and setting it.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import gradio as gr
import numpy as np
from PIL import Image

from demo import render
from demo.inputs import MAX_CATEGORIES
from ovdiff_core.segment import Segmentation
from ovdiff_core.trace import PrototypeRef
from ovdiff_core.types import Category, PrototypeKind

__all__ = [
    "CSS",
    "MARKER_JS",
    "UI",
    "Pick",
    "SegState",
    "Session",
    "TileStore",
    "checked",
    "upload_image",
]

STATIC = Path(__file__).resolve().parent / "static"
CSS = (STATIC / "app.css").read_text(encoding="utf-8")
# Marks the clicked point on the segmentation in the browser at once (no round trip, no
# re-sent image); the marker disappears when a new segmentation image loads.
MARKER_JS = (STATIC / "marker.js").read_text(encoding="utf-8")

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

T = TypeVar("T")


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


@dataclass
class SegState:
    """A visitor's segmentation (``gr.State``), with what-if edits on top of it.

    Attributes:
        original: what ``segment(..., keep_features=True)`` returned; never changed, so
            restoring is showing it again.
        current: the segmentation shown and traced: ``original``, or the what-if result
            without ``excluded_prototypes`` and ``excluded_images``.
        excluded_prototypes: prototypes the visitor took out, in the order taken.
        excluded_images: ``{category: [support image index, ...]}`` taken out.
        changed: (H, W) bool, pixels of ``current`` whose label differs from the
            original's (None when nothing is excluded).
        removed: prototypes the exclusions removed from the banks, in all.
    """

    original: Segmentation
    current: Segmentation
    excluded_prototypes: list[PrototypeRef] = field(default_factory=list)
    excluded_images: dict[str, list[int]] = field(default_factory=dict)
    changed: np.ndarray | None = None
    removed: list[PrototypeRef] = field(default_factory=list)

    @property
    def edited(self) -> bool:
        return bool(self.excluded_prototypes or self.excluded_images)


def current(state: SegState | Segmentation | None) -> Segmentation | None:
    """The segmentation shown: ``state.current``, a bare Segmentation as is, or None."""
    if isinstance(state, SegState):
        return state.current
    return state


@dataclass(frozen=True)
class Pick:
    """What a gallery item points at, for the what-if buttons.

    Attributes:
        prototype: the prototype the item shows (None: only a support image).
        category: the category whose support image it shows (None: no image).
        image_index: that support image (0-based; None: no image).
        text: how the pick is described on the page (plain text, escaped when shown).
    """

    prototype: PrototypeRef | None
    category: str | None
    image_index: int | None
    text: str


class UI(SimpleNamespace):
    """The page's components by name; handler results map onto them by field name."""

    def outputs(self, result_type: type) -> list[Any]:
        """The components a result dataclass updates, in field order."""
        return [getattr(self, f.name) for f in fields(result_type)]

    def values(self, result: Any) -> dict[Any, Any]:
        """``{component: value}`` of a result dataclass (Gradio's dict return)."""
        return {getattr(self, f.name): getattr(result, f.name) for f in fields(result)}


def upload_image(**kwargs: Any) -> gr.Image:
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


def checked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; turn its ValueError into a ``gr.Error`` pop-up with the same message
    (escaped: pop-ups render HTML, and messages may echo names or file names)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise gr.Error(render.esc(err)) from None


def warn_all(notes: Sequence[str]) -> None:
    for note in notes:
        gr.Warning(render.esc(note))


def check_category_limit(session: Session, names: Sequence[str], preset: str | None) -> None:
    """Refuse names that would take the visitor's session past ``MAX_CATEGORIES``.

    Counts the session's categories (all builds and own photos so far) plus the new
    names; rebuilding a name already there does not count twice. A preset change drops
    the session's categories (see ``CategoriesTab._build``), so then only the new names
    count.
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


def category_update(session: Session) -> dict[str, Any]:
    """Choices of a category dropdown: the session's categories, the latest selected."""
    names = list(session.categories)
    return gr.update(choices=names, value=names[-1] if names else None)


def category_summary(cat: Category) -> str:
    sizes = ", ".join(f"{render.md(name)}: {len(b)}" for name, b in cat.banks.items())
    n = len(cat.support) if cat.support is not None else 0
    kind = "stuff" if cat.stuff else "thing"
    return (
        f"**{render.md(cat.name)}** ({kind}) · {n} support images · "
        f"prototypes per extractor: {sizes}"
    )


def prototype_text(ref: PrototypeRef) -> str:
    """Plain-text name of a prototype, e.g. ``cat · foreground part-level #3 (clip)``."""
    side = "foreground" if ref.foreground else "background"
    where = f", support image #{ref.image_index + 1}" if ref.image_index >= 0 else ""
    return f"{ref.category} · {side} {KIND_NAMES[ref.kind]} #{ref.index}{where} ({ref.extractor})"


class TileStore:
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
