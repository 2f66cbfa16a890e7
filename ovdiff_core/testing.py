"""Deprecated alias of :mod:`ovdiff_core.colorworld` (the colour backend's old name).

Kept only until the demo files and ``tests/test_demo_*.py`` import
:mod:`ovdiff_core.colorworld`; then delete this module.
"""

from ovdiff_core.colorworld import (
    ColorExtractor,
    ColorGenerator,
    ColorScorer,
    ColorWorld,
    paint_scene,
)

__all__ = ["ColorExtractor", "ColorGenerator", "ColorScorer", "ColorWorld", "paint_scene"]
