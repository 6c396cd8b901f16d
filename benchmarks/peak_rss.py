"""Peak resident memory of a block of code, sampled by a background thread (shared by the memory benchmarks)."""

from __future__ import annotations

import threading


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.baseline`` and ``m.peak`` in bytes (RSS before and at most during)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
