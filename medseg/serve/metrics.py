"""Counters of the service, rendered in Prometheus' text exposition format (version 0.0.4) at ``/metrics``.

Families (all prefixed ``medseg_``):

* ``requests_total{model, status}`` (counter): ``POST /predict`` requests by the arm that took them and their
  outcome (``ok`` or the error kind, as the request log's ``status`` column);
* ``request_latency_seconds{model}`` (histogram): from arrival to response of the answered requests (status
  ``ok``; refusals, which return at once, would pull it down), with :data:`LATENCY_BUCKETS`;
* ``errors_total{kind}`` (counter): failed requests by kind;
* ``predictions_total{model}`` (counter): predictions made (requests that reached the model and succeeded);
* ``queue_depth`` (gauge): requests admitted and not predicting (uploading, being checked, waiting);
  ``inference_running`` (gauge): being predicted now; ``uptime_seconds`` (gauge).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the latency histogram's buckets; ``+Inf`` is added."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Thread-safe counters; :meth:`render` writes them out."""

    def __init__(self, models: list[str], gauges: Callable[[], dict[str, float]] | None = None) -> None:
        self.models = list(models)
        self._gauges = gauges or dict
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.predictions: Counter[str] = Counter({name: 0 for name in models})
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self._sums: Counter[str] = Counter()
        for name in models:
            self._buckets[name]  # noqa: B018 - every model's histogram shows from the start

    def observe(self, model: str, status: str, seconds: float) -> None:
        """Count one ``/predict`` request that took ``seconds`` and ended in ``status``."""
        with self._lock:
            self.requests[model, status] += 1
            if status != "ok":
                self.errors[status] += 1
                return
            self.predictions[model] += 1
            self._buckets[model][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[model] += seconds

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            lines = _family("requests_total", "counter", "POST /predict requests by model and status.",
                            [({"model": m, "status": s}, n) for (m, s), n in sorted(self.requests.items())])
            lines += ["# HELP medseg_request_latency_seconds Seconds from arrival to response of answered (ok) requests.",
                      "# TYPE medseg_request_latency_seconds histogram"]
            for model, counts in sorted(self._buckets.items()):
                running = 0
                for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
                    running += count
                    lines.append(_sample("request_latency_seconds_bucket", {"model": model, "le": _le(bound)},
                                         running))
                lines.append(_sample("request_latency_seconds_sum", {"model": model}, self._sums[model]))
                lines.append(_sample("request_latency_seconds_count", {"model": model}, running))
            lines += _family("errors_total", "counter", "Failed POST /predict requests by error kind.",
                             [({"kind": k}, n) for k, n in sorted(self.errors.items())])
            lines += _family("predictions_total", "counter", "Predictions made, by model.",
                             [({"model": m}, n) for m, n in sorted(self.predictions.items())])
        gauges = {"uptime_seconds": time.monotonic() - self._started, **self._gauges()}
        for name, value in gauges.items():
            lines += _family(name, "gauge", GAUGE_HELP.get(name, name), [({}, value)])
        return "\n".join(lines) + "\n"


GAUGE_HELP = {"queue_depth": "Requests admitted and not predicting: uploading, being checked or waiting.",
              "inference_running": "Predictions running now.", "uptime_seconds": "Seconds since the app started."}


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    return [f"# HELP medseg_{name} {help_text}", f"# TYPE medseg_{name} {kind}",
            *(_sample(name, labels, value) for labels, value in samples)]


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    text = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
    number = repr(float(value)) if isinstance(value, float) else str(value)
    return f"medseg_{name}{{{text}}} {number}" if text else f"medseg_{name} {number}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
