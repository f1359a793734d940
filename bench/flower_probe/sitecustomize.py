"""Timestamps at every hop of a Flower deployment's message stages (bench/flower_hops.py).

Put on PYTHONPATH with FEDMM_HOP_LOG=DIR, this is imported at start-up by every Python process
of the deployment and wraps, when they are imported: httpx requests (every Flower API call),
the ServerApp grid's push/pull, the SuperNode's message pull and reply push, and the market
worker's task execution. Each process appends ``time event details`` lines to DIR/<pid>.log.
Measurement only: nothing is changed but the timing lines.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import threading
import time

_DIR = os.environ.get("FEDMM_HOP_LOG", "")
_lock = threading.Lock()
_out = None


def _log(event: str, details: str = "") -> None:
    global _out
    with _lock:
        if _out is None:
            _out = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1, encoding="utf-8")
            _out.write(f"#argv {' '.join(sys.argv)[:300]}\n")
        _out.write(f"{time.time():.6f} {event} {details}\n")


def _timed(owner, name: str, report) -> None:
    orig = getattr(owner, name)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        t0 = time.time()
        result = orig(*args, **kwargs)
        report(args, result, t0, time.time())
        return result

    setattr(owner, name, wrapper)


def _patch(name: str, mod) -> None:
    if name == "httpx":
        _timed(mod.Client, "send", lambda a, r, t0, t1: _log("http", f"{t1 - t0:.4f} path={a[1].url.path} began={t0:.6f}"))
    elif name == "flwr.superlink.grid.http_grid":
        _timed(mod.HttpGrid, "push_messages", lambda a, r, t0, t1: _log("srv_push", f"{t1 - t0:.4f} began={t0:.6f}"))
        _timed(mod.HttpGrid, "pull_messages", lambda a, r, t0, t1: _log("srv_pull", f"{t1 - t0:.4f} n={len(r)}"))
    elif name == "flwr.supernode.start_client_internal":
        _timed(mod, "_pull_and_store_message",
               lambda a, r, t0, t1: r is not None and _log("node_pull", f"{t1 - t0:.4f} began={t0:.6f}"))
        _timed(mod, "_push_messages", lambda a, r, t0, t1: _log("node_push", f"{t1 - t0:.4f} began={t0:.6f}"))
    elif name == "fedmm_secure.runtime.flower.executor":
        _timed(mod.InProcessTaskExecutor, "run_one",
               lambda a, r, t0, t1: r and _log("exe_task", f"{t1 - t0:.4f} began={t0:.6f}"))


_TARGETS = ("httpx", "flwr.superlink.grid.http_grid", "flwr.supernode.start_client_internal",
            "fedmm_secure.runtime.flower.executor")


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module, _run=run, _name=name):
                _run(module)
                _patch(_name, module)

            spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _AfterImport())
