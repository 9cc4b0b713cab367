"""The engines' own load, from their Prometheus ``/metrics`` (what vLLM exports).

A scraper thread reads each engine's ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc``
in older releases) every ``interval`` seconds, summed over the label sets (models, LoRAs). The
router's load for an engine is then the proxy's own in-flight prompt blocks plus the engine's
waiting requests priced at the mean prompt size the proxy has seen: work queued ahead of a new
request that the proxy did not send (other routers, direct clients). A scrape that fails
leaves the last value until it is ``stale_after`` old, then the engine's scraped load counts
as unknown (zero) — the failure path is the proxy's health, not the load.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

_RUNNING = ("vllm:num_requests_running",)
_WAITING = ("vllm:num_requests_waiting",)
_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    at: float = 0.0  # monotonic time of the scrape


def parse_vllm_metrics(text: str) -> EngineLoad:
    """The three gauges from a Prometheus text exposition (running and waiting summed over
    label sets, usage the highest); anything unparsable counts as absent."""
    running = waiting = usage = 0.0
    try:
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name in _RUNNING:
                    running += sample.value
                elif sample.name in _WAITING:
                    waiting += sample.value
                elif sample.name in _USAGE:
                    usage = max(usage, sample.value)
    except ValueError:
        log.debug("unparsable engine metrics")
    return EngineLoad(running, waiting, usage, time.monotonic())


class LoadScraper:
    """Scrapes every engine's ``/metrics`` on a thread (start/stop with the service)."""

    def __init__(
        self, urls: dict[str, str], *, interval: float = 2.0, stale_after: float = 10.0
    ) -> None:
        self.urls = {n: u.rstrip("/") for n, u in urls.items()}
        self.interval = interval
        self.stale_after = stale_after
        self.loads: dict[str, EngineLoad] = {}
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LoadScraper:
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvforge-load")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def scrape_once(self, client: httpx.Client) -> None:
        for name, url in self.urls.items():
            try:
                r = client.get(url + "/metrics")
                r.raise_for_status()
            except httpx.HTTPError:
                self.failures += 1
                continue
            self.loads[name] = parse_vllm_metrics(r.text)

    def _run(self) -> None:
        with httpx.Client(timeout=min(2.0, self.interval)) as client:
            while not self._stop.is_set():
                self.scrape_once(client)
                self._stop.wait(self.interval)

    def waiting(self, name: str, now: float | None = None) -> float:
        """The engine's waiting requests, or 0 when unknown or stale."""
        got = self.loads.get(name)
        now = time.monotonic() if now is None else now
        if got is None or now - got.at > self.stale_after:
            return 0.0
        return got.waiting
