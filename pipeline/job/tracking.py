"""Rank 0's sink of the run's figures into an experiment tracker (tracking=[mlflow], [wandb]; pipeline.tracking).

The training thread only puts a report on a bounded queue (no wait, no device sync: the figures are floats the
Reporter has already read); a background thread opens the tracker's run, sends each report the tracker does not hold
yet, and at the end the record's figures, status and files. A tracker that is down, slow or refuses costs the
training nothing: the first error is logged, the thread stops sending, and the record's missing.tracking says what
the tracker lacks and that `python -m pipeline.track sync POINT_DIR` sends it (metrics.jsonl holds every report). A
full queue drops reports the same way."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from pipeline.job.context import Job
from pipeline.tracking.trackers import RunFacts, Tracker, make_tracker, slurm_ids

log = logging.getLogger(__name__)
_END = object()
SEND_EVERY_S = 1.0  # at most a request a second (each costs the tracker, and rank 0's interpreter, a few ms)


class TrackerSink:
    """One tracker's sink (pipeline.job.observe's sink interface: start, log, hparams, end, failures, close).

    Its client is imported here, before training (a second or two of start-up): imported by the background thread
    it would hold the interpreter's lock against the first timed steps (benchmarks/overhead.py --tracking saw a
    quarter of a short run's throughput go). Only the network calls are the thread's."""

    def __init__(self, make: callable, name: str, facts: RunFacts, size: int, close_s: float):
        self.name, self.facts, self.close_s = name, facts, close_s
        self.tracker: Tracker | None = None
        self.failed: str | None = None
        try:
            self.tracker = make()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}"[:500])
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.thread = threading.Thread(target=self._send, name=f"tracker-{name}", daemon=True)
        self.dropped, self.ended = 0, False

    def start(self, step: int) -> None:
        if self.tracker is not None:
            self.thread.start()

    def log(self, metrics: dict, step: int) -> None:
        self._put((step, time.time(), {k: float(v) for k, v in metrics.items()}))

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass  # the tracker has the whole config as its parameters, and the final figures from `end`

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        """The run's end, in the record's words: sent after every report, waited for up to tracking.close_s."""
        if self.ended or not self.thread.is_alive():
            return
        self.ended = True
        self._put((_END, status, figures, files), block=True)
        self.thread.join(self.close_s)
        if self.thread.is_alive():
            self._fail(f"it had not taken the run's end after tracking.close_s={self.close_s:g} s")

    def close(self) -> None:
        if not self.ended and self.thread.is_alive():
            self.end("interrupted", {}, [])

    def failures(self) -> dict[str, str]:
        lost = f"; {self.dropped} report(s) did not fit its queue (tracking.queue)" if self.dropped else ""
        if self.failed is None and not lost:
            return {}
        return {"tracking": f"{self.name}: {self.failed or 'reports were dropped'}{lost}; metrics.jsonl holds "
                            f"them: python -m pipeline.track sync {self.facts.point_dir} sends what it lacks"}

    def _put(self, item, block: bool = False) -> None:
        if self.failed is not None and item[0] is not _END:
            return
        try:
            self.queue.put(item, block=block, timeout=self.close_s if block else None)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("tracking: %s is slower than the training: reports beyond tracking.queue=%d are "
                            "dropped (pipeline.track sync sends them later)", self.name, self.queue.maxsize)

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            log.warning("tracking: %s: %s; training goes on, and pipeline.track sync %s sends what it missed",
                        self.name, why, self.facts.point_dir)

    def _send(self) -> None:
        """The background thread: open, then send what comes, a batch of every report waiting at a time."""
        tracker = self.tracker
        try:
            tracked = tracker.open(self.facts)
            held = tracker.present()
            log.info("tracking: %s run %s (%s)", self.name, tracked.run_id, tracked.where)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}"[:500])
        while True:
            item = self.queue.get()
            batch = [item]
            while item[0] is not _END:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            rows = [(step, unix, {k: v for k, v in values.items() if step not in held.get(k, ())})
                    for step, unix, values in (b for b in batch if b[0] is not _END)] if self.failed is None else []
            try:
                if rows := [r for r in rows if r[2]]:
                    tracker.log(rows)
                if item[0] is _END and self.failed is None:
                    tracker.end(*item[1:])
            except Exception as e:
                self._fail(f"{type(e).__name__}: {e}"[:500])
            if item[0] is _END:
                return
            if rows:  # what comes meanwhile goes as one request: a fast run's reports, a few a second, in one
                time.sleep(SEND_EVERY_S)


def make_trackers(job: Job) -> list[TrackerSink]:
    """Rank 0's tracker sinks, one per tracker of tracking=[...]; none elsewhere."""
    tracking = job.run.tracking
    if not job.is_rank0 or not tracking.names:
        return []
    facts = RunFacts(point_dir=job.point_dir, point=job.point, starting=True, slurm=slurm_ids())
    return [TrackerSink(lambda name=name: make_tracker(name, tracking, job.point_dir), name, facts, tracking.queue,
                        tracking.close_s) for name in tracking.names]
