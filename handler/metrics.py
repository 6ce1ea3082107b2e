"""The handler's own metrics, made to work on any TorchServe configuration.

TorchServe's worker builds its metric cache from the server's metrics configuration
(``metrics_config``; TorchServe's own ``metrics.yaml`` when unset), and ``get_metric`` raises for
a metric that file does not declare. A handler that only looked its metrics up could therefore
load only on servers that run this project's ``metrics.yaml``. Here every metric is looked up
and, when the server's configuration does not declare it, added to the worker's cache at load
time (``add_metric_to_cache``); a metric that still cannot be made is dropped with one warning,
and the handler serves without it.

Which of them reach the frontend's ``/metrics`` endpoint is the server's decision: in
``prometheus`` mode only metrics declared in its ``metrics_config``, or every metric when it sets
``model_metrics_auto_detect=true``; in ``log`` mode they go to ``model_metrics.log``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["METRICS", "MetricSpec", "MetricsEmitter", "HandlerMetrics"]

logger = logging.getLogger(__name__)

_MODEL_DIMS = ("ModelName", "Level")


@dataclass(frozen=True)
class MetricSpec:
    """One metric as a TorchServe metrics configuration declares it."""

    name: str
    kind: str  # "gauge", "counter" or "histogram"
    unit: str
    dimensions: tuple[str, ...] = _MODEL_DIMS


# The single source of the handler's metrics; tests check that metrics.yaml declares the same.
METRICS = (
    MetricSpec("GradcamBatchSize", "gauge", "Count"),
    MetricSpec("GradcamDecodeTime", "gauge", "ms"),
    MetricSpec("GradcamPassTime", "gauge", "ms"),
    MetricSpec("GradcamRenderTime", "gauge", "ms"),
    MetricSpec("GradcamBatches", "counter", "Count", (*_MODEL_DIMS, "BatchSize")),
    MetricSpec("GradcamMaps", "counter", "Count"),
    MetricSpec("GradcamRejected", "counter", "Count", (*_MODEL_DIMS, "Reason")),
    # Per scored map (quality=true): the confidence lost when only its top region is kept.
    MetricSpec("GradcamQualityDrop", "histogram", "Fraction", (*_MODEL_DIMS, "Method")),
)


class MetricsEmitter:
    """What each batch and each rejection records, by the names of :data:`METRICS`; a server's
    metrics backend supplies ``_emit``."""

    def _emit(self, name: str, value: float, extra: tuple[str, ...] = ()) -> None:
        raise NotImplementedError

    def batch(self, size: int, decode_ms: float, pass_ms: float, render_ms: float, maps: int) -> None:
        """One batch: its size, stage times and number of maps."""
        self._emit("GradcamBatchSize", size)
        self._emit("GradcamDecodeTime", decode_ms)
        self._emit("GradcamPassTime", pass_ms)
        self._emit("GradcamRenderTime", render_ms)
        self._emit("GradcamBatches", 1, (str(size),))
        if maps:
            self._emit("GradcamMaps", maps)

    def rejected(self, reason: str) -> None:
        """One request answered with an error of kind ``reason``."""
        self._emit("GradcamRejected", 1, (reason,))

    def quality(self, method: str, drop: float) -> None:
        """One scored map: its method and kept-region ``drop`` (:mod:`handler.quality`)."""
        self._emit("GradcamQualityDrop", drop, (method,))


class HandlerMetrics(MetricsEmitter):
    """Per-batch and per-rejection metrics in TorchServe's metric cache, each one present only if it
    could be made.

    Args:
        cache: the worker's metric cache (``context.metrics``).
        model_name: value of the ``ModelName`` dimension.
    """

    def __init__(self, cache, model_name: str) -> None:
        from ts.metrics.metric_cache_errors import MetricsCacheKeyError
        from ts.metrics.metric_type_enum import MetricTypes

        self.dims = [model_name, "Model"]
        self.metrics = {}
        added, failed = [], []
        for spec in METRICS:
            kind = MetricTypes(spec.kind)
            try:
                try:
                    metric = cache.get_metric(spec.name, kind)
                except MetricsCacheKeyError:
                    metric = cache.add_metric_to_cache(spec.name, spec.unit, list(spec.dimensions), kind)
                    added.append(spec.name)
            except Exception as exc:  # a metric must never stop a load
                failed.append(f"{spec.name} ({type(exc).__name__}: {exc})")
                continue
            self.metrics[spec.name] = metric
        if added:
            logger.info("metrics not declared by the server's metrics configuration, added at load: %s",
                        ", ".join(added))
        if failed:
            logger.warning("serving without these metrics, which could not be made: %s", "; ".join(failed))

    def _emit(self, name: str, value: float, extra: tuple[str, ...] = ()) -> None:
        metric = self.metrics.get(name)
        if metric is None:
            return
        try:
            metric.add_or_update(value, [*self.dims, *extra])
        except Exception as exc:  # TorchServe's own metric code failed
            self.metrics.pop(name)
            logger.warning("metric %s dropped after an error: %s: %s", name, type(exc).__name__, exc)
