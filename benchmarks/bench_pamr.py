"""Time and peak memory of PAMR (ovdiff_core.pamr) at the paper's settings.

Each row refines C random score maps of an S x S random image (10 iterations, dilations
1, 2, 4, 8, 12, 24) in a fresh subprocess, so that the peak resident memory (VmHWM) is the
run's own; the baseline row is the same process importing torch and holding the inputs.
On CUDA the peak is ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_pamr.py                 # CPU: 512 and 1024 px, 21 classes
    python benchmarks/bench_pamr.py --device cuda --sizes 512 1024 2048 --classes 21 171
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, re, sys, time
import numpy as np, torch
sys.path.insert(0, {root!r})
from ovdiff_core.pamr import pamr

size, classes, device, run = {size}, {classes}, {device!r}, {run}
rng = np.random.default_rng(0)
image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
scores = rng.random((classes, size, size), dtype=np.float32)
s = torch.from_numpy(scores).to(device)
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
open("/proc/self/clear_refs", "w").write("5")
seconds = float("nan")
if run:
    pamr(torch.from_numpy(image[:64, :64]).to(device), s[:, :64, :64], dilations=(1, 2))
    if device.startswith("cuda"):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pamr(image, s)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
gpu = (torch.cuda.max_memory_allocated() - base) if device.startswith("cuda") else None
print(json.dumps({{"seconds": seconds, "hwm": hwm, "gpu": gpu}}))
"""


def measure(size: int, classes: int, device: str, run: bool) -> dict:
    code = _CHILD.format(root=str(ROOT), size=size, classes=classes, device=device, run=run)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--classes", type=int, nargs="+", default=[21])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"PAMR, 10 iterations, dilations 1,2,4,8,12,24, device {args.device}\n")
    print("| size | classes | seconds | peak extra memory (MiB) |")
    print("|---:|---:|---:|---:|")
    for size in args.sizes:
        for classes in args.classes:
            got = measure(size, classes, args.device, True)
            if args.device.startswith("cuda"):
                extra = got["gpu"]
            else:
                extra = got["hwm"] - measure(size, classes, args.device, False)["hwm"]
            print(f"| {size} | {classes} | {got['seconds']:.2f} | {extra / 2**20:.0f} |")


if __name__ == "__main__":
    main()
