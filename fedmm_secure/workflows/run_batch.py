"""Many independent runs (e.g. an evaluation's seeds x privacy settings), in this process or in workers.

Runs of different seeds or privacy settings share nothing: each builds its data, models and
randomness from its own config (every generator of a run is seeded from ``cfg.seed``; module
initialisers draw under a forked global generator seeded from it, ``federation.training.seeded``;
DP noise is keyed from the OS, or from the seed in the reproducible mode). Which process runs
a job, and what ran before it there, therefore does not change its result
(``tests/workflows/test_run_batch.py`` checks it). The only state a process carries from one
run to the next is the memo of noise calibrations, a pure function of its arguments. Small
training steps (XMRec's markets) gain little from a second intra-op thread, while two worker
processes keep two cores busy (``bench/RESULTS_throughput.md`` has the measurement).

Workers are started with ``spawn`` (not ``fork``): a forked child of a process whose OpenMP
runtime is already initialised can hang in its first parallel region.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict
from ..errors import ConfigError
from .fedmm_run import run_experiment

__all__ = ["RunJob", "run_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunJob:
    """One run: its raw config (as ``config_from_dict`` takes it) and its output directory."""

    config: dict[str, Any]
    out_dir: Path
    label: str = ""


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_one(job: RunJob) -> dict:
    return run_experiment(config_from_dict(job.config), out_dir=job.out_dir)


def run_jobs(jobs: Sequence[RunJob], *, workers: int = 1, threads: int = 1,
             on_done: Callable[[RunJob, dict], None] | None = None,
             progress: Callable[[RunJob, str], None] | None = None) -> list[dict]:
    """Run every job; return their results (each run's ``results.json`` content) in job order.

    ``workers`` processes each use ``threads`` torch intra-op threads (``workers=1`` runs in this
    process, with ``torch.set_num_threads(threads)``). ``on_done`` is called in this process as
    each job finishes (in completion order); ``progress`` receives the in-run stage messages, in
    this process only (workers report completion alone). A failing run raises its error here,
    after the runs already started have finished; runs not yet started are cancelled.
    """
    for name, v in (("workers", workers), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(name, f"must be an int >= 1, got {v!r}")
    # Configs are checked here, so a bad one fails before any run starts (or any worker spawns).
    configs = [config_from_dict(job.config) for job in jobs]
    results: list[dict | None] = [None] * len(jobs)
    if workers == 1 or len(jobs) <= 1:
        torch.set_num_threads(threads)
        for i, (job, cfg) in enumerate(zip(jobs, configs)):
            tick = None if progress is None else (lambda msg, _f, job=job: progress(job, msg))
            results[i] = run_experiment(cfg, out_dir=job.out_dir, progress=tick)
            if on_done is not None:
                on_done(job, results[i])
        return [r for r in results if r is not None]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                             initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, int] = {pool.submit(_run_one, job): i for i, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    log.info("run %s done", jobs[i].label or jobs[i].out_dir)
                    if on_done is not None:
                        on_done(jobs[i], results[i])
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return [r for r in results if r is not None]
