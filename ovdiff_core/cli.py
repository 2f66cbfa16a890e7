"""The ``ovdiff`` command: build vocabularies, segment folders, evaluate on benchmarks.

::

    ovdiff build voc                                   # support sets + banks into the cache
    ovdiff segment photos/ --vocab "cat,sofa,lamp" --out seg/
    ovdiff eval voc --root ~/data/VOCdevkit            # mIoU table (VOC21; voc20 too)
    ovdiff convert context --src ~/data/context --dst ~/data/VOCdevkit/VOC2010  # once
    ovdiff eval context60 --root ~/data/VOCdevkit      # context59, coco-object too

Every command takes ``--backend real|tiny|color`` (see
:func:`ovdiff_core.backends.build_ovdiff`; ``color``: the colour world of
:mod:`ovdiff_core.colorworld`, no networks), ``--preset cpu|paper``, ``--cache DIR`` and
``--support-size N``. Builds are resumable: classes already in the cache are loaded, not
rebuilt. Progress goes to stderr as tqdm bars (``--quiet`` turns them off); results go to
stdout. Also runs as ``python -m ovdiff_core``.

Under ``torchrun`` or ``accelerate launch`` (see :mod:`ovdiff_core.distributed`) every
command splits its work over the processes: ``build`` the classes, ``eval`` and ``segment``
the images; rank 0 prints the merged results and writes the result files. One process
runs exactly as before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image, ImageOps

from ovdiff_core.backends.presets import BACKENDS, PRESETS, build_ovdiff
from ovdiff_core.config import MASK_RULES
from ovdiff_core.distributed import current, distributed
from ovdiff_core.evaluation.datasets import (
    DATASETS,
    NAME_SETS,
    class_names,
    open_dataset,
    voc_palette,
)
from ovdiff_core.pamr import PAPER_PAMR, PamrConfig, pamr
from ovdiff_core.pipeline import OVDiff, clean_category_name
from ovdiff_core.stuff import STUFF, is_stuff

if TYPE_CHECKING:
    from ovdiff_core.evaluation.datasets import Dataset
    from ovdiff_core.evaluation.run import EvalResult

__all__ = [
    "BuildRow",
    "apply_ablations",
    "build_sharded",
    "build_vocabulary",
    "evaluate_sharded",
    "main",
    "make_model",
    "resolve_vocabulary",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class CLIError(Exception):
    """A user error: the message says what happened and what to do."""


# --------------------------------------------------------------------------- vocabulary


def resolve_vocabulary(spec: str) -> list[str]:
    """Category names from a named set, a text file, or a comma-separated list.

    Args:
        spec: ``voc``, ``context59``, ``coco-object``, ``stuff`` (the thing/stuff table's
            stuff names); or a path to a UTF-8 text file with one name per line (``#``
            starts a comment); or names separated by commas.

    Returns:
        Validated names (see :func:`~ovdiff_core.pipeline.clean_category_name`), in order,
        duplicates dropped.
    """
    path = Path(spec).expanduser()
    if spec in NAME_SETS:
        raw = class_names(spec)
    elif spec == "stuff":
        raw = sorted(STUFF)
    elif path.is_file():
        text = path.read_text("utf-8")
        raw = [line.split("#", 1)[0] for line in text.splitlines()]
    elif "," in spec:
        raw = spec.split(",")
    elif path.suffix in (".txt", ".names") or "/" in spec:
        raise CLIError(f"vocabulary file {spec} does not exist")
    else:
        raw = [spec]
    names: list[str] = []
    for item in raw:
        if not item.strip():
            continue
        try:
            name = clean_category_name(item)
        except ValueError as err:
            raise CLIError(f"vocabulary {spec!r}: {err}") from None
        if name not in names:
            names.append(name)
    if not names:
        raise CLIError(f"vocabulary {spec!r} has no names")
    return names


# --------------------------------------------------------------------------- models


def make_model(
    backend: str,
    preset: str,
    names: Sequence[str],
    cache_dir: str | None = None,
    support_size: int | None = None,
    device: str | None = None,
) -> OVDiff:
    """The model of ``backend`` and ``preset``: :func:`ovdiff_core.backends.build_ovdiff`
    (the colour world tells the vocabulary ``names`` apart), with user errors as
    :class:`CLIError`."""
    if backend not in BACKENDS:
        raise CLIError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if preset not in PRESETS:
        raise CLIError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if support_size is not None and support_size < 1:
        raise CLIError(f"--support-size must be >= 1, got {support_size}")
    return build_ovdiff(
        preset,
        backend=backend,
        cache_dir=cache_dir,
        device=device,
        support_size=support_size,
        names=names,
    )


# --------------------------------------------------------------------------- build


@dataclass
class BuildRow:
    """One class of a vocabulary build (a row of the summary table)."""

    name: str
    stuff: bool
    support_images: int
    cached: bool
    seconds: float
    warning: str | None = None


def _bar(quiet: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=quiet, file=sys.stderr, dynamic_ncols=True, **kwargs)


def build_vocabulary(model: OVDiff, names: Sequence[str], quiet: bool = False) -> list[BuildRow]:
    """Build (or load from the cache) every class of ``names``, with tqdm bars: one over
    the classes, one over the current class's support images. Returns one row per class."""
    rows: list[BuildRow] = []
    with _bar(quiet, total=len(names), desc="classes", unit="class", position=0) as overall:
        for name in names:
            start = time.perf_counter()
            overall.set_postfix_str(name)
            row = BuildRow(name, is_stuff(name, model.stuff_overrides), 0, False, 0.0)
            with _bar(quiet, desc=f"  {name}", unit="img", position=1, leave=False) as bar:
                for event in model.build_iter(name):
                    if event.total is not None and bar.total != event.total:
                        bar.total = event.total
                    if event.stage == "support":
                        bar.update(event.done - bar.n)
                        bar.set_postfix_str("cached" if event.cached else "generating")
                    elif event.stage == "bank":
                        bar.set_postfix_str(f"bank {event.extractor} ready")
                    if event.warning:
                        row.warning = event.warning
                    if event.stage == "done":
                        row.cached = event.cached
                        row.support_images = event.done
                        if event.category_result is not None:
                            row.stuff = event.category_result.stuff
            row.seconds = time.perf_counter() - start
            rows.append(row)
            overall.update(1)
    return rows


def summary_table(rows: Sequence[BuildRow]) -> str:
    """The build summary as a Markdown table plus a totals line."""
    lines = [
        "| class | stuff | support images | from cache | seconds |",
        "|---|---|---:|---|---:|",
    ]
    for r in rows:
        cached = "yes" if r.cached else "no"
        lines.append(
            f"| {r.name} | {'yes' if r.stuff else 'no'} | {r.support_images} | {cached} "
            f"| {r.seconds:.2f} |"
        )
    hits = sum(r.cached for r in rows)
    total = sum(r.seconds for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} classes: {len(rows) - hits} built, {hits} from cache, {total:.1f} s")
    warnings = [f"warning ({r.name}): {r.warning}" for r in rows if r.warning]
    return "\n".join(lines + warnings)


# --------------------------------------------------------------------------- segment


def _image_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise CLIError(f"{item}: no such file or folder")
    if not files:
        raise CLIError(f"no images found in {list(inputs)} (looked for {IMAGE_SUFFIXES})")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise CLIError(f"{path}: cannot read this image ({err}); skip or re-save it") from None


def _segment_one(
    model: OVDiff,
    path: Path,
    names: Sequence[str],
    out: Path,
    stem: str,
    refine: PamrConfig | None = None,
) -> dict:
    image = _read_rgb(path)
    seg = model.segment(image, list(names))
    vocab_index = {n: i + 1 for i, n in enumerate(names)}
    lut = np.array([0] + [vocab_index[n] for n in seg.class_names[1:]], dtype=np.int64)
    kept = seg.labels
    if refine is not None:
        kept = pamr(image, seg.scores, refine.iterations, refine.dilations).argmax(axis=0)
    labels = lut[kept]  # 0 = background, i = names[i - 1]
    palette = voc_palette()
    png = Image.fromarray(labels.astype(np.uint8))
    png.putpalette(palette.ravel().tolist())
    png.save(out / f"{stem}.png")
    colours = palette[labels].astype(np.float32)
    overlay = np.where(labels[..., None] > 0, 0.45 * image + 0.55 * colours, image)
    Image.fromarray(overlay.round().astype(np.uint8)).save(out / f"{stem}_overlay.png")
    total = labels.size
    counts = np.bincount(labels.ravel(), minlength=len(names) + 1)
    all_names = ["background", *names]
    record = {
        "image": str(path),
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "label_png": f"{stem}.png",
        "overlay_png": f"{stem}_overlay.png",
        "labels": {str(i): n for i, n in enumerate(all_names) if i < 256},
        "kept": list(seg.class_names[1:]),
        "areas": {
            all_names[i]: {"pixels": int(c), "fraction": round(float(c) / total, 6)}
            for i, c in enumerate(counts)
            if c > 0
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------- processes
# Several processes under torchrun / accelerate launch (ovdiff_core.distributed). With one
# process each helper does exactly what the commands did before.


def build_sharded(model: OVDiff, names: Sequence[str], quiet: bool = False) -> list[BuildRow]:
    """:func:`build_vocabulary` split over the processes of a launch.

    Each rank builds its round-robin share of ``names`` (class i on rank i % world) into the
    shared cache, then the rows of every rank are gathered (which waits for all ranks).
    Progress bars only on rank 0. One process: :func:`build_vocabulary` itself.

    Returns:
        One row per class of ``names``, in that order, on every rank.
    """
    ctx = current()
    if ctx.world_size == 1:
        return build_vocabulary(model, names, quiet)
    mine = build_vocabulary(model, ctx.shard(list(names)), quiet or not ctx.is_main)
    parts = ctx.all_gather_json([asdict(r) for r in mine])
    rows = {r["name"]: BuildRow(**r) for part in parts for r in part}
    return [rows[n] for n in names]


def _build_all(model: OVDiff, names: Sequence[str], quiet: bool) -> None:
    """Every class of ``names`` ready in ``model``: built by its rank, loaded by the others."""
    if current().world_size == 1:
        build_vocabulary(model, names, quiet)
        return
    build_sharded(model, names, quiet)
    build_vocabulary(model, names, quiet=True)  # all from the cache now


def evaluate_sharded(
    model: OVDiff,
    ds: Dataset,
    background: bool,
    quiet: bool = False,
    names: Sequence[str] | None = None,
    refine: PamrConfig | None = None,
) -> EvalResult:
    """:func:`~ovdiff_core.evaluation.run.evaluate` split over the processes of a launch.

    Each rank segments its images (strided: image i on rank i % world) with the categories
    ``names`` (default ``ds.names``; built already), then the confusion matrices and image
    counts are summed over the ranks (exact int64 sums, so the metrics equal a
    one-process run's). ``seconds`` is the slowest rank's. Progress bar on rank 0 only.

    Returns:
        The dataset-level result, the same on every rank.
    """
    from ovdiff_core.evaluation.metrics import ConfusionMatrix
    from ovdiff_core.evaluation.run import EvalResult, evaluate

    ctx = current()
    indices = ctx.shard(range(len(ds)))
    samples = ds if ctx.world_size == 1 else (ds[i] for i in indices)
    with _bar(quiet or not ctx.is_main, total=len(indices), desc="images", unit="img") as bar:
        local = evaluate(
            model,
            samples,
            ds.names if names is None else names,
            ds.class_names,
            background,
            on_image=lambda *_: bar.update(1),
            refine=refine,
        )
    if ctx.world_size == 1:
        return local
    total = ConfusionMatrix(ds.class_names)
    total.matrix = ctx.all_reduce(local.metrics.matrix)
    total.n_images = int(ctx.all_reduce(np.array([local.metrics.n_images]))[0])
    seconds = float(ctx.all_reduce(np.array([local.seconds]), op="max")[0])
    return EvalResult(total.compute(), seconds)


def _segment_sharded(
    model: OVDiff, files: Sequence[Path], names: Sequence[str], out: Path, quiet: bool,
    stdout: TextIO, refine: PamrConfig | None = None,
) -> int:  # fmt: skip
    """Segment ``files`` (this rank's strided share) into ``out``; returns how many failed
    over all ranks. Output names are decided over the whole list first (``a.png`` twice
    gives ``a`` and ``a-2``), so they do not depend on the number of processes."""
    ctx = current()
    jobs: list[tuple[int, Path, str]] = []
    seen: dict[str, int] = {}
    for i, path in enumerate(files):
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:
            stem = f"{stem}-{seen[stem]}"
        jobs.append((i, path, stem))
    lines: list[tuple[int, str]] = []
    failed = 0
    for i, path, stem in _bar(
        quiet or not ctx.is_main, iterable=ctx.shard(jobs), desc="images", unit="img"
    ):
        try:
            record = _segment_one(model, path, names, out, stem, refine)
        except (CLIError, ValueError) as err:
            print(f"ovdiff segment: {err}", file=sys.stderr)
            failed += 1
            continue
        kept = ", ".join(record["kept"]) or "(none)"
        line = f"{path} -> {out / record['label_png']}  kept: {kept}"
        if ctx.world_size == 1:
            print(line, file=stdout)
        else:
            lines.append((i, line))
    if ctx.world_size == 1:
        return failed
    parts = ctx.all_gather_json({"lines": lines, "failed": failed})
    for _, line in sorted(tuple(x) for part in parts for x in part["lines"]):
        _print_main(str(line), stdout)
    return sum(int(part["failed"]) for part in parts)


def _print_main(text: str, stdout: TextIO) -> None:
    """Print on rank 0 only (every line once per launch)."""
    if current().is_main:
        print(text, file=stdout)


def _processes_line() -> str:
    ctx = current()
    if ctx.world_size == 1:
        return ""
    return f"\nsplit over {ctx.world_size} processes ({ctx.env.launcher}, {ctx.backend})"


def _rank_device(device: str | None) -> str | None:
    """``--device``, or this rank's GPU when several processes run on CUDA and the flag is
    unset or plain ``cuda``."""
    ctx = current()
    if ctx.world_size > 1 and ctx.device.type == "cuda" and device in (None, "cuda"):
        return str(ctx.device)
    return device


# --------------------------------------------------------------------------- commands


def _cmd_build(args: argparse.Namespace, stdout: TextIO) -> int:
    names = resolve_vocabulary(args.vocab)
    model = _model(args, names)
    rows = build_sharded(model, names, args.quiet)
    _print_main(summary_table(rows) + _processes_line(), stdout)
    return 0


def _cmd_segment(args: argparse.Namespace, stdout: TextIO) -> int:
    names = resolve_vocabulary(args.vocab)
    if len(names) > 255:
        raise CLIError(f"--vocab has {len(names)} names; label PNGs hold at most 255 classes")
    files = _image_files(args.images)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model = _model(args, names)
    _build_all(model, names, args.quiet)
    failed = _segment_sharded(model, files, names, out, args.quiet, stdout, _refine(args))
    _print_main(f"{len(files) - failed} of {len(files)} images segmented into {out}", stdout)
    return 1 if failed else 0


def _cmd_eval(args: argparse.Namespace, stdout: TextIO) -> int:
    from ovdiff_core.evaluation.datasets import names_version

    if args.dataset not in DATASETS:
        raise CLIError(f"unknown dataset {args.dataset!r}; use one of {sorted(DATASETS)}")
    background = DATASETS[args.dataset]
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    try:
        ds = open_dataset(args.dataset, args.root, args.split, limit=args.limit)
    except ValueError as err:
        raise CLIError(str(err)) from None
    model = _model(args, ds.names)
    _build_all(model, ds.names, args.quiet)
    result = evaluate_sharded(model, ds, background, args.quiet, refine=_refine(args))
    if not current().is_main:
        return 0
    m = result.metrics
    print(f"## {ds.name} ({args.split}, {m.n_images} images)\n", file=stdout)
    print(m.to_markdown(), file=stdout)
    print(
        f"\nmIoU {100 * m.miou:.2f}  aAcc {100 * m.aacc:.2f}  "
        f"{result.images_per_s:.2f} images/s ({result.seconds:.1f} s)",
        file=stdout,
    )
    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        extra = {
            "dataset": ds.name,
            "split": args.split,
            "names": ds.names_set,
            "names_version": names_version(ds.names_set),
            "settings": {**_settings(args), "mask_rule": model.prototype_config.mask_rule},
            "images_per_s": result.images_per_s,
            "seconds": result.seconds,
            "processes": current().world_size,
        }
        (out / f"{ds.name}.json").write_text(m.to_json(**extra))
        (out / f"{ds.name}.md").write_text(m.to_markdown() + "\n")
        print(f"wrote {out / f'{ds.name}.json'} and {out / f'{ds.name}.md'}", file=stdout)
    return 0


def _cmd_convert(args: argparse.Namespace, stdout: TextIO) -> int:
    from ovdiff_core.evaluation import convert

    bar = _bar(args.quiet, total=None, desc="annotations", unit="img")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        if args.dataset == "context":
            if args.dst is None:
                raise CLIError("convert context needs --dst, the VOC 2010 folder")
            result = convert.convert_context(args.src, args.dst, progress=progress)
        else:
            result = convert.convert_coco_object(
                args.src, args.dst, args.split, crowd=args.crowd, progress=progress
            )
    print(f"wrote {result.n_images} label PNGs into {result.label_dir}", file=stdout)
    for split, path in result.lists.items():
        print(f"  {split}: {path}", file=stdout)
    if result.skipped:
        print(f"  {len(result.skipped)} listed images have no annotation, e.g. "
              f"{result.skipped[:3]}", file=stdout)  # fmt: skip
    return 0


def _refine(args: argparse.Namespace) -> PamrConfig | None:
    """The PAMR settings of ``--pamr`` (the paper's), or None."""
    return PAPER_PAMR if getattr(args, "pamr", False) else None


def _model(args: argparse.Namespace, names: Sequence[str]) -> OVDiff:
    device = _rank_device(args.device)
    model = make_model(args.backend, args.preset, names, args.cache, args.support_size, device)
    if args.mask_rule is not None:  # banks are built anew under their own cache keys
        model.prototype_config = replace(model.prototype_config, mask_rule=args.mask_rule)
    return apply_ablations(
        model,
        background=not args.no_background,
        prefilter=not args.no_prefilter,
        stuff_filter=not args.no_stuff_filter,
        class_mean_only=args.class_mean_only,
        extractors=args.extractors,
    )


def apply_ablations(
    model: OVDiff,
    background: bool = True,
    prefilter: bool = True,
    stuff_filter: bool = True,
    class_mean_only: bool = False,
    extractors: str | None = None,
) -> OVDiff:
    """Switch off parts of the method, as in the paper's ablation table (in place).

    Args:
        background: False = no background prototypes (``SegmentConfig.background``).
        prefilter: False = no CLIP category pre-filter (every class is kept).
        stuff_filter: False = keep other classes' background prototypes however close they
            are to a stuff class's foreground (``stuff_threshold`` above any cosine);
            stuff classes still contribute no background prototypes of their own.
        class_mean_only: keep only the class-mean prototypes (no instance or part
            prototypes); banks are built anew under their own cache keys.
        extractors: comma-separated extractor names to keep (e.g. ``"sd"``,
            ``"clip,dino"``); None = all of the preset's.

    Raises:
        CLIError: an unknown extractor name.
    """
    changes: dict[str, Any] = {}
    if not background:
        changes["background"] = False
    if not prefilter:
        changes["prefilter"] = False
    if not stuff_filter:
        changes["stuff_threshold"] = 2.0  # cosines are <= 1: nothing is dropped
    if changes:
        model.segment_config = model.segment_config.replace(**changes)
    if class_mean_only:
        model.prototype_config = replace(
            model.prototype_config, instance_level=False, part_level=False
        )
    if extractors is not None:
        wanted = [e.strip() for e in extractors.split(",") if e.strip()]
        have = [e.name for e in model.extractors]
        unknown = [w for w in wanted if w not in have]
        if unknown or not wanted:
            raise CLIError(f"--extractors {extractors!r}: this model has extractors {have}")
        model.extractors = [e for e in model.extractors if e.name in wanted]
    return model


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backend": args.backend,
        "preset": args.preset,
        "support_size": args.support_size,
        "no_background": args.no_background,
        "no_prefilter": args.no_prefilter,
        "no_stuff_filter": args.no_stuff_filter,
        "class_mean_only": args.class_mean_only,
        "extractors": args.extractors,
        "pamr": bool(getattr(args, "pamr", False)),
    }


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=BACKENDS, default="real", help="models to use")
    common.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="named settings")
    common.add_argument("--cache", default=None, help="cache folder (default $OVDIFF_CACHE)")
    common.add_argument("--support-size", type=int, default=None, help="images per class")
    common.add_argument("--device", default=None, help="torch device (real/tiny backends)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    ablation = common.add_argument_group("ablations (the paper's table)")
    ablation.add_argument("--no-background", action="store_true", help="no bg prototypes")
    ablation.add_argument("--no-prefilter", action="store_true", help="no CLIP pre-filter")
    ablation.add_argument("--no-stuff-filter", action="store_true", help="no stuff filter")
    ablation.add_argument(
        "--class-mean-only", action="store_true", help="class-mean prototypes only"
    )
    ablation.add_argument(
        "--extractors", default=None, help="extractors to keep, e.g. sd or clip,dino"
    )
    ablation.add_argument(
        "--mask-rule",
        choices=MASK_RULES,
        default=None,
        help="support mask -> feature cells: any (paper), majority (default), eroded",
    )
    pamr_help = "refine scores with PAMR (10 iterations, dilations 1,2,4,8,12,24)"
    parser = argparse.ArgumentParser(
        prog="ovdiff", description="OVDiff open-vocabulary segmentation from the command line"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "build", parents=[common], help="build support sets and banks into the cache"
    )
    p.add_argument(
        "vocab",
        help=f"named set ({', '.join([*NAME_SETS, 'stuff'])}), a text file, or 'a,b,c'",
    )
    p = sub.add_parser("segment", parents=[common], help="segment images or folders")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--vocab", required=True, help="as for build")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pamr", action="store_true", help=pamr_help)
    p = sub.add_parser("eval", parents=[common], help="mIoU on a benchmark")
    p.add_argument("dataset", help="voc (= voc21), voc20, context60, context59 or coco-object")
    p.add_argument("--root", required=True, help="dataset folder (see README)")
    p.add_argument("--split", default="val", help="image list (default val)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown results")
    p.add_argument("--pamr", action="store_true", help=pamr_help)
    p = sub.add_parser("convert", help="one-time conversion of Context / COCO annotations")
    p.add_argument("dataset", choices=("context", "coco-object"))
    p.add_argument("--src", required=True, help="Context download, or the COCO folder")
    p.add_argument("--dst", default=None, help="VOC 2010 folder (context); COCO: default --src")
    p.add_argument("--split", default="val2017", help="coco-object: val2017 or train2017")
    p.add_argument("--crowd", choices=("class", "ignore"), default="class",
                   help="coco-object: crowd regions take their class or 255")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run the ``ovdiff`` command; returns the exit status (0 ok, 1 some images failed,
    2 a usage or input error, reported on stderr as one line saying what to do)."""
    args = _parser().parse_args(argv)
    out = stdout or sys.stdout
    commands = {
        "build": _cmd_build,
        "segment": _cmd_segment,
        "eval": _cmd_eval,
        "convert": _cmd_convert,
    }
    try:
        with distributed():
            return commands[args.command](args, out)
    except CLIError as err:
        print(f"ovdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # library input and file errors say what to do
        print(f"ovdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from ovdiff_core.backends.loading import ModelNotAvailableError

        if not isinstance(err, ModelNotAvailableError):
            raise
        print(f"ovdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
