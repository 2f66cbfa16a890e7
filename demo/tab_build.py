"""Tab 1 · Categories: type names, build (or load) their support sets and prototypes.

Reads top to bottom: results, handlers (:class:`CategoriesTab`, no browser needed),
layout, wiring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from demo import render
from demo.inputs import (
    MAX_CATEGORIES,
    bounded_number,
    parse_category_names,
    split_names_leniently,
)
from demo.state import (
    MAX_GALLERY,
    SUPPORT_SIZE_MAX,
    SUPPORT_SIZE_MIN,
    UI,
    Session,
    category_summary,
    category_update,
    check_category_limit,
    checked,
)
from ovdiff_core.pipeline import BuildProgress
from ovdiff_core.stuff import is_stuff
from ovdiff_core.types import Category, SupportSet

if TYPE_CHECKING:
    from demo.app import DemoApp

# --------------------------------------------------------------------------- results


@dataclass
class BuildResult:
    """One streamed step of a build (fields are the components they update).

    Attributes:
        support_gallery: (tile path, caption) of the latest support images.
        build_status: status Markdown.
        session: the visitor's session.
        how_cat: update of the category dropdowns (tab 4), ``gr.update()`` for none.
    """

    support_gallery: list[tuple[str, str]]
    build_status: str
    session: Session
    how_cat: Any


@dataclass
class StuffResult:
    """Thing/stuff toggle update and the names now listed."""

    stuff_box: Any
    typed_names: list[str]


# --------------------------------------------------------------------------- handlers


def build_size(support_size: Any) -> int | None:
    """The support-set size a build asks for (None: the preset's), checked: a ``gr.Error``
    for NaN, infinities, non-numbers and values outside the slider's range."""
    if support_size is None or support_size == "" or support_size == 0:
        return None
    return checked(
        bounded_number, support_size, "Support-set size", SUPPORT_SIZE_MIN, SUPPORT_SIZE_MAX
    )


def support_caption(support: SupportSet, i: int, offset: int, cached: bool) -> str:
    fg = 100.0 * float(support.foreground[i].mean())
    bg = 100.0 * float(support.background[i].mean())
    tag = " · cached" if cached else ""
    return f"{support.category} #{offset + i + 1} · fg {fg:.0f}% · bg {bg:.0f}%{tag}"


class CategoriesTab:
    """Handlers of tab 1 (thin wrappers over the shared models of ``app``)."""

    def __init__(self, app: DemoApp) -> None:
        self.app = app

    def ready_set(self, label: str | None) -> str:
        """Text of a ready-made category set (empty for an unknown label)."""
        return self.app.info.ready_sets.get(label or "", "")

    def stuff_choices(
        self, text: str, selected: list[str] | None, previous: list[str] | None
    ) -> StuffResult:
        """Thing/stuff toggle for the typed names: keeps the visitor's choices, prefills new
        names from the built-in table."""
        names = split_names_leniently(text)
        selected_set = set(selected or [])
        known = set(previous or [])
        value = [n for n in names if n in selected_set or (n not in known and is_stuff(n))]
        return StuffResult(gr.update(choices=names, value=value), names)

    def check_build(
        self,
        names_text: str,
        preset: str,
        support_size: float | None,
        session: Session | None = None,
    ) -> None:
        """Raise ``gr.Error`` for what :meth:`build` would refuse (no side effects).

        With ``session``, also refuse names that would take the visitor past
        ``MAX_CATEGORIES`` categories in all.
        """
        app = self.app
        names = checked(parse_category_names, names_text)
        if preset not in app.hosting.presets:
            raise gr.Error(f"Choose a preset ({', '.join(app.hosting.presets)}).")
        size = build_size(support_size)
        limit = app.support_limit(preset)
        if size is not None and size > limit:
            why = "one GPU call" if app.hosting.zero_gpu else "this server"
            raise gr.Error(
                f"Support-set size is at most {limit} for the '{preset}' preset on {why}; "
                "choose a smaller size."
            )
        if session is not None:
            check_category_limit(session, names, preset)

    def build(
        self,
        names_text: str,
        stuff_names: list[str] | None,
        preset: str,
        support_size: float | None,
        session: Session,
        progress: Any = None,
    ) -> Iterator[BuildResult]:
        """Build (or load) every typed category, streaming support images as they arrive:
        one :class:`BuildResult` after each support batch and when each category is done.

        ``progress``: a ``gr.Progress``-like callable (None: no progress bar).
        """
        self.check_build(names_text, preset, support_size, session)
        names = parse_category_names(names_text)
        size = build_size(support_size)
        progress = progress or (lambda *a, **k: None)
        yield from self._build(names, set(stuff_names or []), preset, size, session, progress)

    def _build(
        self,
        names: list[str],
        stuff: set[str],
        preset: str,
        size: int | None,
        session: Session,
        progress: Any,
    ) -> Iterator[BuildResult]:
        app = self.app
        model = app.model(preset, size, progress=progress)
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

        def step(status: str, dropdown: Any = None) -> BuildResult:
            return BuildResult(
                tiles[-MAX_GALLERY:],
                "\n\n".join([*lines, status] if status else lines),
                session,
                dropdown if dropdown is not None else gr.update(),
            )

        for k, name in enumerate(names):
            progress(k / len(names), desc=f"{name}: starting")
            shown = render.md(name)  # the name as literal Markdown text
            yield step(f"**{shown}**: checking the cache...")
            try:
                offset = 0
                result: Category | None = None
                cached = unsaved = False
                # Files present: most likely served from the cache, so no generation turn
                # (the UNet itself is still used by one capture at a time).
                likely_cached = model.is_cached(name)
                for ev in self._class_steps(likely_cached, preset, size, name, name in stuff):
                    if isinstance(ev, str):  # waiting for another visitor's generation
                        yield step(f"**{shown}**: {ev}")
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
                            caption = support_caption(batch, i, offset, ev.cached)
                            tiles.append((app.tiles.save(tile), caption))
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
                    yield step(status)
            except (ValueError, RuntimeError, OSError) as err:
                raise gr.Error(render.esc(f"Building '{name}' failed: {err}")) from None
            if result is None:
                raise gr.Error(render.esc(f"Building '{name}' ended without a category."))
            session.categories.pop(name, None)
            session.categories[name] = result
            tag = " (cached ✓)" if cached else ""
            tag += " (not saved to the cache)" if unsaved else ""
            lines.append(category_summary(result) + tag)
            yield step("", category_update(session))
        progress(1.0, desc="done")
        plural = "category" if len(names) == 1 else "categories"
        yield step(
            f"Ready: {len(names)} {plural}. Segment an image in tab 3.", category_update(session)
        )

    def _class_steps(
        self, cached: bool, preset: str, size: int | None, name: str, stuff: bool
    ) -> Iterator[str | BuildProgress]:
        """The build events of one category, preceded, when it must be generated, by a
        status line each second while another build holds this process's generation
        turn. The turn is released when the events end, fail or are abandoned."""
        app = self.app
        with contextlib.ExitStack() as turn:
            if not cached:
                waited = 0
                while not app.generation.acquire(timeout=1.0):
                    waited += 1
                    yield f"waiting for another visitor's build to finish ({waited} s)..."
                turn.callback(app.generation.release)
            yield from app.build_class_gpu(preset, size, name, stuff)


# --------------------------------------------------------------------------- layout


def layout(ui: UI, app: DemoApp, default_preset: str, first_names: list[str]) -> None:
    """Tab 1's components, added to ``ui``."""
    info, hosting = app.info, app.hosting
    with gr.Row():
        ui.names_box = gr.Textbox(
            value=info.default_names,
            label=f"Category names (comma-separated, at most {MAX_CATEGORIES})",
            placeholder="cat, sofa, lamp",
            elem_id="names",
            scale=3,
        )
        ui.ready = gr.Dropdown(
            choices=list(info.ready_sets),
            value=None,
            label="Ready-made sets",
            elem_id="ready-sets",
            scale=1,
        )
    ui.stuff_box = gr.CheckboxGroup(
        choices=first_names,
        value=[n for n in first_names if is_stuff(n)],
        label="Stuff categories (amorphous: sky, grass...): no background "
        "prototypes, always kept by the pre-filter. Unticked = thing.",
        elem_id="stuff",
    )
    with gr.Row():
        ui.preset = gr.Radio(
            choices=list(hosting.presets),
            value=default_preset,
            label="Preset",
            info="cpu: fast settings for a laptop; paper: the authors' settings (needs a GPU)",
            elem_id="preset",
        )
        ui.support_size = gr.Slider(
            SUPPORT_SIZE_MIN,
            app.max_support,
            value=min(info.default_support, app.max_support),
            step=1,
            label="Support images per category",
            elem_id="support-size",
        )
    ui.build_btn = gr.Button("Build categories", variant="primary", elem_id="build")
    ui.build_status = gr.Markdown(elem_id="build-status")
    ui.support_gallery = gr.Gallery(
        fit_columns=False,
        label="Support images. Each tile: photo | attribution map (cross-attention "
        "to the name) / masks (green = foreground, blue = background) | foreground",
        columns=3,
        height=520,
        elem_id="support-gallery",
        object_fit="contain",
    )


# --------------------------------------------------------------------------- wiring


def wire(ui: UI, tab: CategoriesTab) -> None:
    """Tab 1's events."""
    ui.ready.change(tab.ready_set, ui.ready, ui.names_box, queue=False)

    def on_names(text: str, selected: list[str] | None, previous: list[str] | None) -> Any:
        return ui.values(tab.stuff_choices(text, selected, previous))

    gr.on(
        [ui.names_box.change],
        on_names,
        [ui.names_box, ui.stuff_box, ui.typed_names],
        ui.outputs(StuffResult),
        queue=False,
        trigger_mode="always_last",
    )

    def on_build(
        names: str,
        stuff: list[str] | None,
        preset: str,
        size: float | None,
        session: Session,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's convention
    ) -> Iterator[dict[Any, Any]]:
        for step in tab.build(names, stuff, preset, size, session, progress):
            yield ui.values(step)

    # Bad input is reported by a quick check with no outputs, so that an error pop-up
    # leaves the gallery and status of the last build untouched.
    ui.build_btn.click(
        tab.check_build,
        [ui.names_box, ui.preset, ui.support_size, ui.session],
        None,
        concurrency_limit=None,
        show_progress="hidden",
    ).success(lambda: gr.update(interactive=False), None, ui.build_btn, queue=False).success(
        # Not a GPU call itself: cached categories load at once, and each category that
        # must be generated is one GPU call of its own (DemoApp.build_class). Generation
        # waits for its turn inside the handler, so visitors whose categories are cached
        # never queue behind another visitor's generation.
        on_build,
        [ui.names_box, ui.stuff_box, ui.preset, ui.support_size, ui.session],
        ui.outputs(BuildResult),
        concurrency_limit=16,
        concurrency_id="build",
        api_name="build",  # a stable name for API clients (benchmarks/soak.py)
    ).then(lambda: gr.update(interactive=True), None, ui.build_btn, queue=False)
