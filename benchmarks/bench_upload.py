"""Decode time and peak memory of an upload, from small photos to a decompression bomb.

Each case is a PNG or JPEG written to a temporary folder, then loaded by
:func:`demo.inputs.load_image` (what the app's check and segment handlers call, through
``load_upload``) in a fresh subprocess. Reported: the file size, decode time, the
peak resident memory the decode added (``VmHWM`` after the call minus ``VmRSS`` before
it, with the high-water mark reset after the imports), the process's ``ru_maxrss``
(imports of numpy, PIL and torch included), and the outcome (downscaled size, or the
refusal message).

Usage::

    python benchmarks/bench_upload.py [--quick]

``--quick`` skips the two largest accepted cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.inputs import MAX_DECODE_PIXELS, MAX_SIDE  # noqa: E402

CHILD = """
import json, resource, sys, time
from demo.inputs import load_image

def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])

base = status_kib("VmRSS")
try:  # reset the peak-RSS mark (VmHWM) to the current RSS: the imports do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
start = time.perf_counter()
try:
    out = load_image(sys.argv[1])
    result = {"outcome": "accepted, %dx%d" % (out.image.shape[1], out.image.shape[0])}
except ValueError as err:
    result = {"outcome": "refused: " + str(err)[:70] + "..."}
except MemoryError:
    result = {"outcome": "MemoryError"}
result["seconds"] = time.perf_counter() - start
result["peak_mib"] = (status_kib("VmHWM") - base) / 1024
result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def _write(folder: Path, name: str, size: tuple[int, int], mode: str) -> Path:
    """A (W, H) test image: a smooth gradient (realistic decode work), or zeros (bomb)."""
    w, h = size
    path = folder / name
    if name.startswith("bomb"):
        Image.new(mode, size).save(path, compress_level=9)
        return path
    x = np.linspace(0, 255, w, dtype=np.float32)
    row = x.astype(np.uint8)
    if mode == "I;16":
        ramp = (np.linspace(0, 65535, w, dtype=np.float32)).astype(np.uint16)
        Image.fromarray(np.broadcast_to(ramp, (h, w)).copy()).save(path, compress_level=1)
        return path
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = np.empty((h, w, channels), dtype=np.uint8)
    arr[:] = row[None, :, None]
    if channels == 4:
        arr[..., 3] = 200
    im = Image.fromarray(arr, mode)
    if path.suffix == ".jpg":
        im.save(path, quality=90)
    else:
        im.save(path, compress_level=1)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the largest cases")
    parser.add_argument(
        "--write", nargs=4, metavar=("PATH", "W", "H", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.write:
        path, w, h, mode = args.write
        _write(Path(path).parent, Path(path).name, (int(w), int(h)), mode)
        return
    side = int((MAX_DECODE_PIXELS) ** 0.5)
    cases = [
        ("photo.jpg", (1024, 768), "RGB"),
        ("photo.png", (1024, 768), "RGB"),
        ("12mpx.jpg", (4000, 3000), "RGB"),
        ("12mpx.png", (4000, 3000), "RGB"),
        ("24mpx-rgba.png", (6000, 4000), "RGBA"),
        ("24mpx-16bit.png", (6000, 4000), "I;16"),
        (f"budget-rgba-{side}.png", (side, side), "RGBA"),
        (f"budget-16bit-{side}.png", (side, side), "I;16"),
        ("100mpx.jpg", (10000, 10000), "RGB"),
        ("bomb-13000.png", (13000, 13000), "RGBA"),
    ]
    if args.quick:
        cases = [c for c in cases if not c[0].startswith("budget")]
    print(f"pixel budget {MAX_DECODE_PIXELS / 1e6:.0f} Mpx, long side after decode <= {MAX_SIDE}")
    print(
        f"{'case':<24} {'W x H':>13} {'Mpx':>6} {'file MB':>8} {'s':>6} {'+peak MiB':>9} "
        f"{'maxrss MiB':>10}  outcome"
    )
    largest: dict[str, tuple[float, str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        for name, size, mode in cases:
            # written by a subprocess: a child inherits its parent's ru_maxrss at fork
            path = Path(tmp) / name
            subprocess.run(
                [sys.executable, __file__, "--write", str(path), str(size[0]), str(size[1]), mode],
                check=True,
            )
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mpx = size[0] * size[1] / 1e6
            print(
                f"{name:<24} {size[0]:>6}x{size[1]:<6} {mpx:>6.1f} "
                f"{path.stat().st_size / 1e6:>8.2f} {r['seconds']:>6.2f} {r['peak_mib']:>9.0f} "
                f"{r['maxrss_mib']:>10.0f}  "
                f"{r['outcome']}"
            )
            path.unlink()
            fmt = path.suffix
            if r["outcome"].startswith("accepted") and mpx > largest.get(fmt, (0.0, "", 0.0))[0]:
                largest[fmt] = (mpx, name, r["peak_mib"])
    for fmt, (mpx, name, peak) in sorted(largest.items()):
        print(f"largest accepted {fmt}: {name} ({mpx:.0f} Mpx), decode peak +{peak:.0f} MiB")


if __name__ == "__main__":
    main()
