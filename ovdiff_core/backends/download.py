"""Download exactly the model files a preset loads, nothing more.

Usage::

    python -m ovdiff_core.backends.download --preset cpu          # CPU: fp32 weights
    python -m ovdiff_core.backends.download --preset paper --fp16 # GPU: SD fp16 variant
    python -m ovdiff_core.backends.download --preset cpu --print  # only print `hf` commands

Files land in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, or ``--cache-dir``),
where the loaders find them offline. Models that are already complete are skipped;
missing files are fetched and broken ones (truncated, unparsable) fetched again. The
``OVDIFF_*_MODEL`` variables apply; local directories are only checked, never written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ovdiff_core.backends.loading import (
    MissingModel,
    ModelNotAvailableError,
    check_model,
    ensure_model,
)
from ovdiff_core.backends.presets import PRESETS, preset_models

__all__ = ["main"]


def _printer(stage: str, fraction: float | None, message: str) -> None:
    pct = f"{fraction:4.0%} " if fraction is not None else ""
    print(f"[{stage}] {pct}{message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 = every model complete)."""
    parser = argparse.ArgumentParser(
        prog="python -m ovdiff_core.backends.download", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="Stable Diffusion fp16 weights (what a CUDA GPU loads); default fp32 (CPU)",
    )
    parser.add_argument("--cache-dir", default=None, help="hub cache (default HF_HUB_CACHE)")
    parser.add_argument(
        "--print",
        dest="dry_run",
        action="store_true",
        help="download nothing; print the state of each model and the `hf` command",
    )
    args = parser.parse_args(argv)
    refs = preset_models(args.preset, fp16=args.fp16)
    if args.dry_run:
        missing: list[MissingModel] = []
        for ref in refs:
            m = check_model(ref, args.cache_dir)
            print(f"{'ready  ' if m is None else 'MISSING'} {ref.describe()}")
            if m is not None:
                missing.append(m)
                print(f"        {m.fix}")
        return 1 if missing else 0
    status = 0
    for i, ref in enumerate(refs):
        prefix = f"Downloading {ref.label} ({i + 1}/{len(refs)})"
        try:
            path = ensure_model(ref, args.cache_dir, _printer, prefix)
        except ModelNotAvailableError as err:
            print(f"FAILED  {ref.describe()}\n{err}", file=sys.stderr)
            status = 1
            continue
        print(f"ready   {ref.describe()} -> {path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
