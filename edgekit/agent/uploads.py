"""Queueing selected samples for upload without slowing requests down.

Requests only hand a sample over (``submit``); a writer thread compresses it and appends it to the durable queue
(``State.enqueue``: one SQLite transaction, fsynced). A sample is acknowledged once that transaction has committed
(``acknowledged``). The hand-over queue is bounded: when the writer falls behind, new samples are dropped and
counted, never blocking a request. Once the day's byte budget is spent, nothing more is considered that day.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping

import numpy as np

from edgekit.agent.select import day_of, encode_sample, next_day
from edgekit.agent.state import State

log = logging.getLogger(__name__)


class UploadWriter:
    def __init__(self, state: State, budget_per_day: int, *, backlog: int = 8) -> None:
        self.state = state
        self.budget = int(budget_per_day)
        self._q: queue.Queue = queue.Queue(maxsize=backlog)
        self._closed_until = 0.0  # time.time() before which today's budget is known to be spent
        self.stats = {"dropped": 0, "over_budget": 0, "acknowledged": 0}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open_today(self) -> bool:
        """False once today's budget is known to be spent (the day is UTC). One float comparison: the request
        path asks."""
        return time.time() >= self._closed_until

    def submit(self, sample: Mapping[str, np.ndarray], meta: dict, model: str | None) -> bool:
        """Hand a sample (copied) to the writer; False when it was dropped because the writer is behind."""
        item = ({k: np.array(v, copy=True) for k, v in sample.items()}, meta, model, day_of())
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.stats["dropped"] += 1
            return False
        self._ensure_thread()
        return True

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="edgekit-uploads", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            sample, meta, model, day = item
            try:
                qid = self.state.enqueue(encode_sample(sample), meta, model=model, day=day, budget=self.budget)
                if qid is None:
                    self.stats["over_budget"] += 1
                    self._closed_until = next_day(day)
                else:
                    self.stats["acknowledged"] += 1
            except Exception:  # noqa: BLE001 - the writer must survive a bad moment (disk full, ...)
                log.exception("could not queue a sample for upload")
            finally:
                self._q.task_done()

    def drain(self) -> None:
        """Wait until every handed-over sample is written (or refused)."""
        if self._thread is not None and self._thread.is_alive():
            self._q.join()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=30)
