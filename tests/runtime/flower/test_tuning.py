"""The Flower waits we shorten, and the executor's refusal of foreign apps."""

from __future__ import annotations

import io
import time
import types
import zipfile

import pytest

pytest.importorskip("flwr")

from fedmm_secure.runtime.flower.executor import CLIENTAPP_REF, fab_clientapp_ref  # noqa: E402
from fedmm_secure.runtime.flower.local import APP_PYPROJECT  # noqa: E402
from fedmm_secure.runtime.flower.tuning import (  # noqa: E402
    OBJECT_PULL_BACKOFF_S,
    capped_sleep_clock,
    fast_object_pulls,
)


def test_capped_clock_caps_sleep_and_is_otherwise_time():
    clock = capped_sleep_clock(0.01)
    t0 = time.monotonic()
    clock.sleep(3.0)
    assert time.monotonic() - t0 < 1.0
    assert clock.monotonic is time.monotonic and clock.time is time.time
    with pytest.raises(ValueError):
        capped_sleep_clock(0.0)


def test_capped_clock_local_waits_get_their_own_cap():
    # Flower's sub-second sleeps are waits on the SuperNode's own state: capped much shorter.
    clock = capped_sleep_clock(5.0, local_cap=0.01)
    t0 = time.monotonic()
    for _ in range(5):
        clock.sleep(0.5)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ValueError):
        capped_sleep_clock(0.1, local_cap=0.0)


def test_fast_object_pulls_binds_short_backoff():
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    mod = types.ModuleType("fake")
    mod.pull_objects = pull_objects
    fast_object_pulls(mod)
    assert mod.pull_objects.func is pull_objects
    assert mod.pull_objects.keywords["initial_backoff"] == OBJECT_PULL_BACKOFF_S
    with pytest.raises(AttributeError):
        fast_object_pulls(types.ModuleType("empty"))


def test_flower_modules_still_have_what_we_tune():
    # A Flower upgrade that renames these would silently bring the 3 s / 1 s waits back.
    import flwr.superlink.grid.http_grid as grid
    import flwr.supernode.start_client_internal as loop

    assert hasattr(loop, "time") and hasattr(loop, "pull_objects") and hasattr(grid, "pull_objects")
    assert callable(loop._pull_and_store_message)   # the doorbell rings after it (.supernode)


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


def test_executor_recognises_only_our_clientapp():
    assert fab_clientapp_ref(_fab(APP_PYPROJECT)) == CLIENTAPP_REF
    other = APP_PYPROJECT.replace(CLIENTAPP_REF, "evil.module:app")
    assert fab_clientapp_ref(_fab(other)) == "evil.module:app"
    assert fab_clientapp_ref(b"not a zip") is None
    assert fab_clientapp_ref(_fab("[project]\nname='x'\n")) is None
    assert fab_clientapp_ref(_fab("not = [toml")) is None


def test_executor_survives_an_unreachable_supernode(caplog):
    import logging
    import threading

    from fedmm_secure.runtime.flower.executor import InProcessTaskExecutor
    from fedmm_secure.runtime.flower.processes import free_port

    # No log sink given: the executor warns on its module's logger (the worker routes it to its log).
    caplog.set_level(logging.WARNING, logger="fedmm_secure.runtime.flower.executor")
    ex = InProcessTaskExecutor(runtime_api_address=f"127.0.0.1:{free_port()}", handle=lambda k, p: (k, p),
                               insecure=True, poll_interval=0.01)
    ex._client._retry_invoker.max_tries = 1   # fail fast instead of Flower's connection retries
    stop = threading.Event()
    t = threading.Thread(target=ex.run_forever, args=(stop,), daemon=True)
    t.start()
    time.sleep(1.5)
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive() and ex.tasks_run == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "fedmm_secure.runtime.flower.executor"]
    assert 1 <= len(lines) <= 4   # logged, backed off, not spammed
    assert all(line.startswith("executor: ") for line in lines)


def test_doorbell_wakes_once_per_burst_and_times_out_otherwise(tmp_path):
    import stat

    from fedmm_secure.runtime.flower.doorbell import Doorbell, ring

    path = tmp_path / "bell"
    ring(path)   # nobody listening yet: a lost ring is not an error
    with Doorbell(path) as bell:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        t0 = time.monotonic()
        assert bell.wait(0.05) is False and time.monotonic() - t0 >= 0.04
        for _ in range(3):
            ring(path)
        assert bell.wait(5.0) is True
        assert bell.wait(0.05) is False   # the burst was one wake-up
    assert not path.exists()
    with Doorbell(path) as bell:          # a stale socket left by a killed worker is replaced
        Doorbell(path)
        ring(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):          # anything else at the path is not
        Doorbell(tmp_path / "file")


def test_supernode_rings_only_after_storing_a_message(tmp_path):
    from fedmm_secure.runtime.flower.doorbell import Doorbell
    from fedmm_secure.runtime.flower.supernode import ringing

    results = iter([None, 42])
    with Doorbell(tmp_path / "bell") as bell:
        pull = ringing(lambda **kw: next(results), str(tmp_path / "bell"))
        assert pull(state=None) is None and bell.wait(0.1) is False
        assert pull(state=None) == 42 and bell.wait(5.0) is True


def test_executor_waits_on_the_doorbell_not_the_poll(tmp_path):
    import threading

    from fedmm_secure.runtime.flower.doorbell import Doorbell, ring
    from fedmm_secure.runtime.flower.executor import InProcessTaskExecutor
    from fedmm_secure.runtime.flower.processes import free_port

    calls = []

    class Counting(InProcessTaskExecutor):
        def run_one(self) -> bool:
            calls.append(time.monotonic())
            return False

    path = tmp_path / "bell"
    with Doorbell(path) as bell:
        # A 30 s fallback poll: only the ring can bring the second look within the test.
        ex = Counting(runtime_api_address=f"127.0.0.1:{free_port()}", handle=lambda k, p: (k, p),
                      insecure=True, poll_interval=30.0, doorbell=bell)
        stop = threading.Event()
        t = threading.Thread(target=ex.run_forever, args=(stop,), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(calls) == 1   # looked once, now waiting
        rung = time.monotonic()
        ring(path)
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2 and calls[1] - rung < 5.0
        # A stop is seen while waiting for the bell, without a ring and long before the poll.
        time.sleep(0.2)
        stopped = time.monotonic()
        stop.set()
        t.join(timeout=10)
        assert not t.is_alive() and time.monotonic() - stopped < 5.0
