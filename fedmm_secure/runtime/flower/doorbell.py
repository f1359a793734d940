"""A doorbell: the SuperNode tells its market's worker that a task is waiting.

Flower 1.40's Runtime API has no way to wait for a task: an executor asks ``AcquireTask`` again
and again. Polled every 50 ms by five workers, that is ~100 requests a second to the SuperNodes
while idle, and a secure-sum stage still waits for the next poll (and, having acquired a task
before the SuperNode finished storing the message's objects, retries those objects). With a
doorbell, the SuperNode launcher (:mod:`.supernode`, ``FEDMM_SUPERNODE_DOORBELL``) sends one
datagram to the worker once a message and its objects are stored, and the worker's executor
waits on it; its poll (``--poll-interval``) stays as the fallback for a lost datagram.

The doorbell is a Unix datagram socket at a path the operator picks next to the market's other
files (no port to collide with another process's; reachable by whoever may write to its
directory; the socket itself is made owner-only). A ring carries no data and is only a hint to
ask the SuperNode now: at worst a stray ring makes the worker poll its own SuperNode, whose
answer is what counts. Linux and other systems with ``AF_UNIX`` datagram sockets only; without
one, run the worker without ``--doorbell`` (it polls).
"""

from __future__ import annotations

import os
import select
import socket
import stat
from pathlib import Path

__all__ = ["Doorbell", "ring"]

_DRAIN_MAX = 64   # rings are coalesced: one wake-up however many arrived


def ring(path: str | os.PathLike) -> None:
    """Ring the doorbell at ``path``; never raises (the worker's poll is the fallback)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)   # a full queue already holds a ring: never block the SuperNode
            s.sendto(b"\x01", os.fspath(path))
    except OSError:
        pass


class Doorbell:
    """The worker's end: a Unix datagram socket bound at ``path`` (a stale socket file left
    there by an earlier worker is replaced; any other file is an error)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def wait(self, timeout: float) -> bool:
        """Block until a ring (True) or ``timeout`` seconds (False); pending rings are consumed."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        for _ in range(_DRAIN_MAX):
            try:
                self._sock.recv(16)
            except OSError:   # BlockingIOError: drained
                break
        return True

    def close(self) -> None:
        self._sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "Doorbell":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
