"""MetricsReporter: buffers a replica's samples and pushes one MetricsReport to the hub
every `interval_s` (fire-and-forget, off the request path)."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from serving.metrics import EngineSample, MetricsReport, RequestSample

log = logging.getLogger(__name__)


class MetricsReporter:
    def __init__(self, hub_handle, reporter_id: str, interval_s: float = 0.5,
                 collect_engine: Callable[[], EngineSample] | None = None):
        self.hub, self.reporter_id, self.interval_s = hub_handle, reporter_id, interval_s
        self.collect_engine = collect_engine
        self._lock = threading.Lock()
        self._requests: list[RequestSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-reporter", daemon=True)
        self._thread.start()

    def record_request(self, sample: RequestSample) -> None:
        with self._lock:
            self._requests.append(sample)

    def flush(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        engine = self.collect_engine() if self.collect_engine else None
        if requests or engine is not None:
            self.hub.apply.remote(MetricsReport(self.reporter_id, requests, engine))

    def stop(self) -> None:
        self._stop.set()
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:   # metrics must never take the replica down
                log.warning("metrics flush failed: %s", exc)
