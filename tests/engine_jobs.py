"""Driving the serving engine in-process: submit jobs, wait for each one's end."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from shortv.serve import Engine, Job
from shortv.serve.engine import Failed, Finished


def run_jobs(engine: Engine, jobs: Sequence[tuple[Job, float]], *,
             cancel: frozenset[str] = frozenset()) -> dict[str, object]:
    """Submit each job, then sleep its pause; cancel those named in `cancel` right after
    their submission (queued, or already prefilling). Each other job's Finished or
    Failed event, by id."""
    events: dict[str, object] = {}
    done = threading.Semaphore(0)
    for job, pause in jobs:
        def sink(event, name=job.id) -> None:
            if isinstance(event, Finished | Failed):
                events[name] = event
                done.release()

        job.sink = sink
        engine.submit(job)
        if job.id in cancel:
            engine.cancel(job)
        time.sleep(pause)
    wanted = {job.id for job, _ in jobs} - cancel
    while not wanted <= events.keys():  # (a cancelled job may still have ended first)
        assert done.acquire(timeout=300)
    return events
