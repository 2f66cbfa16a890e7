"""Soak test of a running app: memory and disk must level off however many visitors come.

Starts ``app.py`` (colour backend: no neural network, so this measures what the app and
the library keep, not model weights) with the hosting defaults of :mod:`demo.hosting`,
then plays N visitors one after another through Gradio's HTTP API (``gradio_client``):
each opens a new session, builds one category name nobody asked for before, and segments
a 1024 px image. Every ``--every`` visitors it prints the server's resident memory (RSS,
from /proc) and the bytes on disk in the cache, in the app's tile folder and in Gradio's
temporary folder. By default each visitor then leaves (the API client stops its heartbeat,
as a closed browser tab does, and the app's unload handler frees the session). With
``--keep-open`` no visitor ever leaves during the run, the worst case: sessions then go only
by the session cap (``OVDIFF_MAX_SESSIONS``) and their time to live.

Usage::

    python benchmarks/soak.py [--visitors 200] [--every 20] [--side 1024]
        [--keep-open] [--env OVDIFF_MAX_SESSIONS=64 ...]

The run is bounded: N visitors, each with a 120 s limit, on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/harness.py

from harness import run_app  # noqa: E402


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _du_mib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # deleted while we walk
                total += os.lstat(os.path.join(root, f)).st_size
    return total / 2**20


def _scene(side: int, path: Path) -> None:
    from ovdiff_core.colorworld import ColorWorld, paint_scene

    world = ColorWorld.default()
    boxes = [
        (world.parts["cat"], (side // 8, side // 8, side // 3, side // 3)),
        (world.parts["sofa"], (side // 2, side // 2, side // 3, side // 3)),
    ]
    image, _ = paint_scene((side, side), (40, 40, 40), boxes, seed=1)
    Image.fromarray(np.asarray(image)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--keep-open", action="store_true", help="visitors never leave")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the app")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ovdiff-soak-"))
    cache, gtemp, tiles = work / "cache", work / "gradio-tmp", work / "tiles"
    for d in (cache, gtemp, tiles):
        d.mkdir()
    scene = work / "scene.png"
    _scene(args.side, scene)
    env = {
        "GRADIO_TEMP_DIR": str(gtemp),
        "TMPDIR": str(tiles),  # the app's tile folder is made with tempfile.mkdtemp
        **dict(kv.split("=", 1) for kv in args.env),
    }
    leave = "stay connected" if args.keep_open else "leave after segmenting"
    print(f"# settings: {' '.join(args.env) or 'defaults'}; image {args.side} px; visitors {leave}")
    try:
        with run_app("color", cache_dir=cache, env=env) as app:
            _visit(app.url, app.process.pid, args, scene, cache, tiles, gtemp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _visit(
    url: str, pid: int, args: argparse.Namespace, scene: Path, cache: Path, tiles: Path, gtemp: Path
) -> None:
    """Play the visitors against the app at ``url`` (process ``pid``), printing the table."""
    from gradio_client import Client, handle_file

    cols = ("visitors", "names built", "RSS MiB", "cache MiB", "tiles MiB", "Gradio temp MiB")
    print("| " + " | ".join(cols) + " | s/visitor |")
    print("|" + "---|" * 7)
    open_clients: list[Client] = []
    start = time.monotonic()
    last = start
    print(f"| 0 | 0 | {_rss_mib(pid):.0f} | 0 | 0 | 0 | - |")
    for v in range(1, args.visitors + 1):
        client = Client(url, verbose=False, download_files=False)
        client.predict(f"soak name {v}", [], "cpu", 4, api_name="/build")
        client.predict(handle_file(str(scene)), api_name="/segment")
        if args.keep_open:
            open_clients.append(client)
        else:
            client.close()
        if v % args.every == 0 or v == args.visitors:
            now = time.monotonic()
            per = (now - last) / args.every
            last = now
            print(
                f"| {v} | {v} | {_rss_mib(pid):.0f} | {_du_mib(cache):.1f} | "
                f"{_du_mib(tiles):.1f} | {_du_mib(gtemp):.1f} | {per:.2f} |",
                flush=True,
            )
    print(f"# total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
