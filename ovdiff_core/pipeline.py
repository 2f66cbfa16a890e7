"""The high-level object: build categories (cached), segment images, keep it all together."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovdiff_core.cache import Cache, tensor_checksum
from ovdiff_core.config import ALGORITHM_VERSION, PrototypeConfig, SegmentConfig
from ovdiff_core.protocols import FeatureExtractor, ImageTextScorer, SupportGenerator
from ovdiff_core.prototypes import build_bank
from ovdiff_core.segment import Segmentation, segment
from ovdiff_core.stuff import is_stuff
from ovdiff_core.types import Category, PrototypeBank, SupportSet

__all__ = ["BuildProgress", "OVDiff", "clean_category_name", "extract_features"]

MAX_NAME_LENGTH = 100


def clean_category_name(name: str) -> str:
    """Validate and normalise a category name (whitespace collapsed, stripped).

    Raises:
        ValueError: empty, longer than 100 characters, containing control characters,
            or equal to the reserved label "background".
    """
    if not isinstance(name, str):
        raise ValueError(f"category name must be a string, got {type(name).__name__}")
    if re.search(r"[\x00-\x1f\x7f]", name):
        raise ValueError(f"category name {name[:40]!r} contains control characters; remove them")
    cleaned = " ".join(name.split())
    if not cleaned:
        raise ValueError("category name is empty; type a name such as 'cat'")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise ValueError(
            f"category name is {len(cleaned)} characters long; use at most {MAX_NAME_LENGTH}"
        )
    if cleaned.lower() == "background":
        raise ValueError("'background' is reserved: background prototypes come with every class")
    return cleaned


def extract_features(
    extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 8
) -> torch.Tensor:
    """Features of uint8 images.

    Args:
        images: (N, H, W, 3) uint8 RGB.

    Returns:
        (N, D, h, w) float32 from ``extractor``, computed ``batch_size`` images at a time.
    """
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            out.append(extractor(chunk.permute(0, 3, 1, 2).float() / 255.0).float().cpu())
    return torch.cat(out)


def concat_supports(parts: Sequence[SupportSet]) -> SupportSet:
    """Concatenate support-set batches of one category (settings of the first)."""
    return SupportSet(
        category=parts[0].category,
        images=np.concatenate([p.images for p in parts]),
        attributions=np.concatenate([p.attributions for p in parts]),
        foreground=np.concatenate([p.foreground for p in parts]),
        background=np.concatenate([p.background for p in parts]),
        settings=parts[0].settings,
    )


@dataclass
class BuildProgress:
    """One step of :meth:`OVDiff.build_iter`.

    Attributes:
        category: the category being built.
        stage: ``"support"`` (support images arrived), ``"bank"`` (one extractor's bank is
            ready) or ``"done"``.
        batch: the support images that just arrived (stage "support"), else None.
        done: support images available so far.
        total: support images expected (None if unknown).
        cached: True when this step was read from the cache rather than computed.
        extractor: the extractor whose bank is ready (stage "bank").
        category_result: the finished :class:`Category` (stage "done").
    """

    category: str
    stage: str
    batch: SupportSet | None = None
    done: int = 0
    total: int | None = None
    cached: bool = False
    extractor: str | None = None
    category_result: Category | None = None


class OVDiff:
    """Open-vocabulary segmentation with diffusion-generated support sets.

    Components are passed in (see :mod:`ovdiff_core.backends` for real ones):

    Args:
        generator: makes support sets for names; None if you only add your own support
            images with :meth:`add_support`.
        extractors: feature extractors (their scores are averaged).
        scorer: image-text scorer for the CLIP pre-filter (optional).
        prototypes: stage-2 settings.
        segmentation: stage-3 settings.
        cache: on-disk cache; None keeps everything in memory only.
        stuff_overrides: ``{name: is_stuff}`` overriding the built-in thing/stuff table.
    """

    def __init__(
        self,
        generator: SupportGenerator | None,
        extractors: Sequence[FeatureExtractor],
        scorer: ImageTextScorer | None = None,
        prototypes: PrototypeConfig | None = None,
        segmentation: SegmentConfig | None = None,
        cache: Cache | None = None,
        stuff_overrides: Mapping[str, bool] | None = None,
    ) -> None:
        if not extractors:
            raise ValueError("OVDiff: pass at least one feature extractor")
        self.generator = generator
        self.extractors = list(extractors)
        self.scorer = scorer
        self.prototypes = prototypes or PrototypeConfig()
        self.segmentation = segmentation or SegmentConfig()
        self.cache = cache
        self.stuff_overrides = dict(stuff_overrides or {})
        self.categories: dict[str, Category] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ keys

    def support_key(self, name: str) -> str:
        """Cache key of the generated support set of ``name``."""
        if self.generator is None:
            raise ValueError("OVDiff has no generator; add support images with add_support()")
        return Cache.key("support", self.generator.spec(name))

    def bank_key(self, support_key: str, extractor: FeatureExtractor) -> str:
        return Cache.key(
            "bank",
            {
                "support": support_key,
                "extractor": extractor.spec(),
                "prototypes": self.prototypes.to_dict(),
                "algorithm_version": ALGORITHM_VERSION,
            },
        )

    def is_cached(self, name: str) -> bool:
        """Whether support set and every bank of ``name`` are in the cache already."""
        if self.cache is None or self.generator is None:
            return False
        name = clean_category_name(name)
        skey = self.support_key(name)
        if not self.cache.path("support", name, skey).is_file():
            return False
        return all(
            self.cache.path("bank", name, self.bank_key(skey, e)).is_file() for e in self.extractors
        )

    # ------------------------------------------------------------------ building

    def _banks(
        self, support: SupportSet, skey: str
    ) -> Iterator[tuple[FeatureExtractor, PrototypeBank, bool]]:
        with self._lock:
            current = self.categories.get(support.category)
        built = current.banks if current is not None and current.support is support else {}
        for ex in self.extractors:
            done = built.get(ex.name)
            if done is not None and done.settings.get("prototypes") == self.prototypes.to_dict():
                yield ex, done, True
                continue
            bkey = self.bank_key(skey, ex)
            bank = self.cache.load_bank(bkey, support.category) if self.cache else None
            if bank is not None:
                yield ex, bank, True
                continue
            bank = build_bank(
                support, extract_features(ex, support.images), ex.name, self.prototypes
            )
            if self.cache is not None:
                self.cache.save_bank(bkey, bank)
            yield ex, bank, False

    def _finish(
        self, support: SupportSet, skey: str, stuff: bool | None
    ) -> Iterator[BuildProgress]:
        name = support.category
        banks: dict[str, PrototypeBank] = {}
        for ex, bank, cached in self._banks(support, skey):
            banks[ex.name] = bank
            yield BuildProgress(
                name,
                "bank",
                done=len(support),
                total=len(support),
                cached=cached,
                extractor=ex.name,
            )
        flag = is_stuff(name, self.stuff_overrides) if stuff is None else stuff
        cat = Category(name=name, banks=banks, support=support, stuff=flag)
        with self._lock:
            self.categories[name] = cat
        yield BuildProgress(
            name, "done", done=len(support), total=len(support), category_result=cat
        )

    def _built_support(self, name: str, spec: dict[str, Any]) -> SupportSet | None:
        """The in-memory support set of ``name`` if it was generated with ``spec``."""
        with self._lock:
            cat = self.categories.get(name)
        if cat is None or cat.support is None or cat.support.settings != spec:
            return None
        return cat.support

    def build_iter(self, name: str, stuff: bool | None = None) -> Iterator[BuildProgress]:
        """Build one category step by step (support batches stream as they are generated).

        Args:
            name: category name (validated with :func:`clean_category_name`).
            stuff: thing/stuff flag; None uses the built-in table and overrides.

        Yields:
            :class:`BuildProgress` events; the last has stage "done" and the category.
        """
        name = clean_category_name(name)
        if self.generator is None:
            raise ValueError("OVDiff has no generator; add support images with add_support()")
        skey = self.support_key(name)
        spec = self.generator.spec(name)
        total = spec.get("n_images") if isinstance(spec.get("n_images"), int) else None
        lock = self.cache.lock("support", skey) if self.cache else contextlib.nullcontext()
        with lock:
            support = self._built_support(name, spec)
            if support is None and self.cache is not None:
                support = self.cache.load_support(skey, name)
            if support is not None:
                yield BuildProgress(
                    name, "support", batch=support, done=len(support), total=total, cached=True
                )
            else:
                parts: list[SupportSet] = []
                for batch in self.generator.generate(name):
                    parts.append(batch)
                    done = sum(len(p) for p in parts)
                    yield BuildProgress(name, "support", batch=batch, done=done, total=total)
                if not parts:
                    raise RuntimeError(f"the generator produced no support images for {name!r}")
                support = concat_supports(parts)
                if self.cache is not None:
                    self.cache.save_support(skey, support)
            yield from self._finish(support, skey, stuff)

    def build(self, names: Iterable[str]) -> list[Category]:
        """Build (or load from the cache) every category in ``names``."""
        out = []
        for name in names:
            out.append(_final(self.build_iter(name)))
        return out

    def add_support(self, support: SupportSet, stuff: bool | None = None) -> Category:
        """Make a category from your own support set (in-context mode); cached by content."""
        name = clean_category_name(support.category)
        if name != support.category:
            support = SupportSet(
                name, support.images, support.attributions, support.foreground,
                support.background, support.settings,
            )  # fmt: skip
        skey = Cache.key(
            "support",
            {
                "user": tensor_checksum(support.tensors()),
                "settings": support.settings,
                "name": name,
            },
        )
        return _final(self._finish(support, skey, stuff))

    def remove(self, name: str) -> None:
        with self._lock:
            self.categories.pop(name, None)

    # ------------------------------------------------------------------ segmentation

    def segment(
        self,
        image: np.ndarray,
        names: Sequence[str] | None = None,
        config: SegmentConfig | None = None,
    ) -> Segmentation:
        """Segment ``image`` ((H, W, 3) uint8 RGB) into built categories.

        Args:
            names: which built categories to use (default: all, in build order).
            config: override of the stage-3 settings for this call.
        """
        with self._lock:
            if names is None:
                cats = list(self.categories.values())
            else:
                missing = [n for n in names if n not in self.categories]
                if missing:
                    raise ValueError(
                        f"segment: categories {missing} are not built; build() them first"
                    )
                cats = [self.categories[n] for n in names]
        if not cats:
            raise ValueError("segment: no categories are built yet; call build([...]) first")
        return segment(image, cats, self.extractors, config or self.segmentation, self.scorer)


def _final(events: Iterable[BuildProgress]) -> Category:
    """Run a build to the end and return its category."""
    result = None
    for event in events:
        result = event.category_result or result
    if result is None:
        raise RuntimeError("build ended without a category")
    return result
