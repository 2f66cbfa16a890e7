"""Regenerate the example images of this folder from installed packages (no download).

Usage: ``python assets/make_assets.py``. See README.md here for sources and licences.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MAX_SIDE = 512


def _save(arr: np.ndarray, name: str) -> None:
    im = Image.fromarray(arr).convert("RGB")
    s = MAX_SIDE / max(im.size)
    if s < 1:
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
    im.save(HERE / name, quality=85)
    print(f"{name}: {im.width}x{im.height}")


def main() -> None:
    import skimage.data
    from matplotlib import cbook

    sys.path.insert(0, str(HERE.parent))
    from ovdiff_core.colorworld import ColorWorld, paint_scene

    _save(skimage.data.chelsea(), "cat.jpg")
    _save(skimage.data.coffee(), "coffee.jpg")
    _save(skimage.data.astronaut(), "astronaut.jpg")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        _save(np.asarray(Image.open(f)), "grace_hopper.jpg")
    w = ColorWorld.default()
    scene, _ = paint_scene(
        (192, 256),
        (200, 200, 200),
        [
            (w.parts["cat"], (24, 16, 80, 72)),
            (w.parts["sofa"], (96, 112, 72, 120)),
            (w.parts["lamp"], (16, 176, 48, 32)),
            (w.parts["grass"], (168, 0, 24, 256)),
        ],
        seed=3,
    )
    Image.fromarray(scene).save(HERE / "colour_scene.png")
    print("colour_scene.png: 256x192")


if __name__ == "__main__":
    main()
