"""The high-level object: build categories (cached), segment images, keep it all together."""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovdiff_core.cache import Cache, CacheWriteError, tensor_checksum
from ovdiff_core.config import ALGORITHM_VERSION, PrototypeConfig, SegmentConfig
from ovdiff_core.protocols import FeatureExtractor, ImageTextScorer, SupportGenerator
from ovdiff_core.prototypes import build_bank
from ovdiff_core.segment import Segmentation, segment
from ovdiff_core.stuff import is_stuff
from ovdiff_core.types import Category, PrototypeBank, SupportSet

__all__ = [
    "DEFAULT_MAX_CATEGORIES",
    "BuildProgress",
    "CacheWriteWarning",
    "OVDiff",
    "clean_category_name",
    "extract_features",
]

MAX_NAME_LENGTH = 100
DEFAULT_MAX_CATEGORIES = 64  # categories kept in OVDiff.categories (least recently used go)


class CacheWriteWarning(UserWarning):
    """A category was built and is usable, but could not be saved to the cache."""


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
        (N, D, h, w) from ``extractor``, computed ``batch_size`` images at a time, on the
        extractor's device and in its dtype (a GPU extractor's features stay on the GPU
        for stage 2; :func:`~ovdiff_core.prototypes.build_bank` returns a CPU bank).
    """
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            out.append(extractor(chunk.permute(0, 3, 1, 2).float() / 255.0))
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
        cached: True when this step was read from the cache (or reused from memory) rather
            than computed. On the "done" event: True only if every step was.
        extractor: the extractor whose bank is ready (stage "bank").
        category_result: the finished :class:`Category` (stage "done").
        warning: set when what this step built could not be saved to the cache (disk full,
            read-only cache...): the message says what happened and what to do. The build
            goes on and its category is usable; it is rebuilt next time.
    """

    category: str
    stage: str
    batch: SupportSet | None = None
    done: int = 0
    total: int | None = None
    cached: bool = False
    extractor: str | None = None
    category_result: Category | None = None
    warning: str | None = None


class OVDiff:
    """Open-vocabulary segmentation with diffusion-generated support sets.

    Components are passed in (see :mod:`ovdiff_core.backends` for real ones):

    Args:
        generator: makes support sets for names; None if you only add your own support
            images with :meth:`add_support`.
        extractors: feature extractors (their scores are averaged).
        scorer: image-text scorer for the CLIP pre-filter (optional).
        prototype_config: stage-2 settings.
        segment_config: stage-3 settings.
        cache: on-disk cache; None keeps everything in memory only.
        stuff_overrides: ``{name: is_stuff}`` overriding the built-in thing/stuff table.
        max_categories: how many built categories :attr:`categories` keeps (default 64);
            the least recently built or used go first. Categories you hold stay valid;
            an evicted name is reloaded from the cache by :meth:`segment` when possible.
            None = unbounded.

    Raises:
        ValueError: no extractors, or ``max_categories`` < 1.
    """

    def __init__(
        self,
        generator: SupportGenerator | None,
        extractors: Sequence[FeatureExtractor],
        scorer: ImageTextScorer | None = None,
        prototype_config: PrototypeConfig | None = None,
        segment_config: SegmentConfig | None = None,
        cache: Cache | None = None,
        stuff_overrides: Mapping[str, bool] | None = None,
        max_categories: int | None = DEFAULT_MAX_CATEGORIES,
    ) -> None:
        if not extractors:
            raise ValueError("OVDiff: pass at least one feature extractor")
        if max_categories is not None and max_categories < 1:
            raise ValueError(f"OVDiff: max_categories must be >= 1 or None, got {max_categories}")
        self.generator = generator
        self.extractors = list(extractors)
        self.scorer = scorer
        self.prototype_config = prototype_config or PrototypeConfig()
        self.segment_config = segment_config or SegmentConfig()
        self.cache = cache
        self.stuff_overrides = dict(stuff_overrides or {})
        self.max_categories = max_categories
        # built categories in build order, at most max_categories (LRU order in _recency)
        self.categories: dict[str, Category] = {}
        self._recency: OrderedDict[str, None] = OrderedDict()  # least recently used first
        # evicted generated categories that segment() may reload: name -> stuff flag
        self._evicted: OrderedDict[str, bool] = OrderedDict()
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
                "prototypes": self.prototype_config.to_dict(),
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

    # ------------------------------------------------------------------ registry

    def _remember(self, cat: Category) -> None:
        """Put ``cat`` in the registry as most recently used; evict beyond the bound."""
        with self._lock:
            self.categories[cat.name] = cat  # a rebuilt name keeps its place in build order
            self._recency.pop(cat.name, None)
            self._recency[cat.name] = None
            self._evicted.pop(cat.name, None)
            for stale in [n for n in self._recency if n not in self.categories]:
                del self._recency[stale]  # removed by hand from ``categories``
            limit = self.max_categories
            while limit is not None and len(self.categories) > limit and self._recency:
                oldest, _ = self._recency.popitem(last=False)
                old = self.categories.pop(oldest, None)
                if old is None:
                    continue
                if self._is_generated(old):  # reloadable from the cache; keep its flag
                    self._evicted[old.name] = old.stuff
                    while len(self._evicted) > 16 * limit:
                        self._evicted.popitem(last=False)

    def _registered(self, name: str) -> Category | None:
        """The registry's category ``name`` (marked as used), or None."""
        with self._lock:
            cat = self.categories.get(name)
            if cat is not None:
                self._recency.pop(name, None)
                self._recency[name] = None
            return cat

    def _is_generated(self, cat: Category) -> bool:
        """Whether ``cat`` is the generator's category of its name (not own photos)."""
        if self.generator is None or cat.support is None:
            return False
        return bool(cat.support.settings == self.generator.spec(cat.name))

    def _reload(self, name: str) -> Category | None:
        """Evicted category ``name`` from the cache, computing nothing; None if absent."""
        with self._lock:
            stuff = self._evicted.get(name)
        if self.cache is None or self.generator is None or stuff is None:
            return None
        skey = self.support_key(name)
        support = self.cache.load_support(skey, name)
        if support is None:
            return None
        banks = {}
        for ex in self.extractors:
            bank = self.cache.load_bank(self.bank_key(skey, ex), name)
            if bank is None:
                return None
            banks[ex.name] = bank
        cat = Category(name=name, banks=banks, support=support, stuff=stuff)
        self._remember(cat)
        return cat

    def _save(self, what: str, save: Callable[..., object], *args: object) -> str | None:
        """Run a cache write ``save(*args)``; a failure becomes a warning text (the build
        goes on with what it has in memory)."""
        try:
            save(*args)
        except CacheWriteError as err:
            return f"{what} is ready but was not saved to the cache: {err}"
        return None

    # ------------------------------------------------------------------ building

    def _banks(
        self, support: SupportSet, skey: str
    ) -> Iterator[tuple[FeatureExtractor, PrototypeBank, bool, str | None]]:
        """(extractor, bank, cached, warning of a failed cache write) per extractor."""
        current = self._registered(support.category)
        built = current.banks if current is not None and current.support is support else {}
        for ex in self.extractors:
            done = built.get(ex.name)
            if (
                done is not None
                and done.settings.get("prototypes") == self.prototype_config.to_dict()
            ):
                yield ex, done, True, None
                continue
            bkey = self.bank_key(skey, ex)
            bank = self.cache.load_bank(bkey, support.category) if self.cache else None
            if bank is not None:
                yield ex, bank, True, None
                continue
            bank = build_bank(
                support, extract_features(ex, support.images), ex.name, self.prototype_config
            )
            warning = None
            if self.cache is not None:
                what = f"{support.category!r} (bank of `{ex.name}`)"
                warning = self._save(what, self.cache.save_bank, bkey, bank)
            yield ex, bank, False, warning

    def _finish(
        self,
        support: SupportSet,
        skey: str,
        stuff: bool | None,
        support_cached: bool,
        warning: str | None = None,
    ) -> Iterator[BuildProgress]:
        """Bank events, then "done". ``warning`` (of the support's cache write) rides on the
        first bank event; "done" is cached only if the support and every bank were."""
        name = support.category
        banks: dict[str, PrototypeBank] = {}
        all_cached = support_cached
        for ex, bank, cached, bank_warning in self._banks(support, skey):
            banks[ex.name] = bank
            all_cached = all_cached and cached
            notes = [w for w in (warning, bank_warning) if w]
            warning = None
            yield BuildProgress(
                name,
                "bank",
                done=len(support),
                total=len(support),
                cached=cached,
                extractor=ex.name,
                warning="\n".join(notes) or None,
            )
        flag = is_stuff(name, self.stuff_overrides) if stuff is None else stuff
        cat = Category(name=name, banks=banks, support=support, stuff=flag)
        self._remember(cat)
        yield BuildProgress(
            name,
            "done",
            done=len(support),
            total=len(support),
            cached=all_cached,
            category_result=cat,
        )

    def _built_support(self, name: str, spec: dict[str, Any]) -> SupportSet | None:
        """The in-memory support set of ``name`` if it was generated with ``spec``."""
        cat = self._registered(name)
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
            A failed cache write does not stop the build: the next event carries a
            ``warning`` and the category is still returned (and kept in memory).
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
            warning = None
            support_cached = support is not None
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
                    warning = self._save(
                        f"{name!r} (support set)", self.cache.save_support, skey, support
                    )
            yield from self._finish(support, skey, stuff, support_cached, warning)

    def build(self, names: Iterable[str]) -> list[Category]:
        """Build (or load from the cache) every category in ``names``."""
        out = []
        for name in names:
            out.append(_final(self.build_iter(name)))
        return out

    def add_support(self, support: SupportSet, stuff: bool | None = None) -> Category:
        """Make a category from your own support set (in-context mode); cached by content.

        A failed cache write is reported as a :class:`CacheWriteWarning`; the category is
        returned all the same (see :meth:`add_support_iter` for the events).
        """
        return _final(self.add_support_iter(support, stuff))

    def add_support_iter(
        self, support: SupportSet, stuff: bool | None = None
    ) -> Iterator[BuildProgress]:
        """:meth:`add_support` step by step: one "bank" event per extractor, then "done"."""
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
        yield from self._finish(support, skey, stuff, support_cached=False)

    def remove(self, name: str) -> None:
        with self._lock:
            self.categories.pop(name, None)
            self._recency.pop(name, None)

    # ------------------------------------------------------------------ segmentation

    def segment(
        self,
        image: np.ndarray,
        categories: Sequence[str | Category] | None = None,
        config: SegmentConfig | None = None,
        keep_features: bool = False,
    ) -> Segmentation:
        """Segment ``image`` ((H, W, 3) uint8 RGB) into categories and background.

        Args:
            categories: which categories to use, in label order: names of built
                categories, :class:`Category` objects (used as given, e.g. one visitor's
                own categories, and not put in :attr:`categories`), or a mix; default:
                all in :attr:`categories`, in build order. A name dropped from the
                registry (see ``max_categories``) is reloaded from the cache when it is
                there. Repeated names count once.
            config: override of the stage-3 settings for this call.
            keep_features: keep the target features for what-if edits (see
                :func:`~ovdiff_core.segment.segment`).

        Raises:
            ValueError: a name that is neither built nor in the cache, an item that is
                neither a name nor a Category, two different categories of one name, or
                a category without a bank for one of the extractors.
        """
        if categories is None:
            with self._lock:
                cats = list(self.categories.values())
        elif isinstance(categories, (str, Category)):
            raise ValueError(
                "segment: categories must be a list of names or Category objects, got a "
                f"single {type(categories).__name__}; wrap it in a list"
            )
        else:
            cats = self._resolve(categories)
        if not cats:
            raise ValueError("segment: no categories are built yet; call build([...]) first")
        config = config or self.segment_config
        return segment(image, cats, self.extractors, config, self.scorer, keep_features)

    def _resolve(self, items: Sequence[str | Category]) -> list[Category]:
        """Categories of names and Category objects, in order (a name once)."""
        out: dict[str, Category] = {}
        missing: list[str] = []
        for item in items:
            if isinstance(item, Category):
                other = out.get(item.name)
                if other is not None and other is not item:
                    raise ValueError(
                        f"segment: two different categories are named {item.name!r}; "
                        "rename one or pass only one of them"
                    )
                out[item.name] = item
            elif isinstance(item, str):
                if item in out or item in missing:
                    continue
                cat = self._registered(item) or self._reload(item)
                if cat is None:
                    missing.append(item)
                else:
                    out[item] = cat
            else:
                raise ValueError(
                    "segment: categories must be names (str) or Category objects, got "
                    f"{type(item).__name__}"
                )
        if missing:
            raise ValueError(
                f"segment: categories {missing} are not built (or were dropped from "
                f"memory, which keeps the {self.max_categories} most recently used, and "
                "are not in the cache); build() them again or raise max_categories"
            )
        return list(out.values())


def _final(events: Iterable[BuildProgress]) -> Category:
    """Run a build to the end and return its category."""
    result = None
    for event in events:
        result = event.category_result or result
        if event.warning:
            warnings.warn(event.warning, CacheWriteWarning, stacklevel=3)
    if result is None:
        raise RuntimeError("build ended without a category")
    return result
