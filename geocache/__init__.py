"""geocache: offline cache-then-train toolkit for geometry-aware fine-tuning of LLMs."""

from importlib.metadata import PackageNotFoundError, version

from geocache.cache import collate_cache_rows, open_cache
from geocache.config import GeometryConfig
from geocache.losses import (
    AdaptiveGeometryScheduler,
    GeometryAwareLoss,
    midband_layer_weights,
    router_divergence_loss,
    router_jaccard,
)
from geocache.signals import BaseStats, cached_kl, compute_base_stats, geometry_signals, labelled_positions

try:
    __version__ = version("geocache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdaptiveGeometryScheduler",
    "BaseStats",
    "GeometryAwareLoss",
    "GeometryConfig",
    "cached_kl",
    "collate_cache_rows",
    "compute_base_stats",
    "geometry_signals",
    "labelled_positions",
    "midband_layer_weights",
    "open_cache",
    "router_divergence_loss",
    "router_jaccard",
    "__version__",
]
