"""Processes of a local Flower deployment: installed tools, free ports, process groups, markers.

Every process a deployment starts lives in a process group of its own and inherits the
deployment's environment marker (:data:`MARKER`), so it can be found and stopped even after it
left its group (Flower's SuperLink starts its SuperExec in a new session).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ...errors import ConfigError

__all__ = ["BIN", "MARKER", "free_port", "tool", "pids_with_env", "marked_pids", "group_exists", "killpg"]

BIN = Path(sys.executable).parent
MARKER = "FEDMM_FLOWER_DEPLOYMENT"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """Path of the console script ``name`` installed next to this interpreter."""
    p = BIN / name
    if not p.exists():
        raise ConfigError("flower", f"{name} not found next to {sys.executable}",
                          allowed="install the 'flower' extra: pip install 'fedmm-secure[flower]'")
    return str(p)


def pids_with_env(name: str, value: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose environment has ``name=value``
    (Linux /proc; elsewhere an empty list and the process groups are all there is). Every
    process a deployment starts inherits its marker, so this finds the ones that left our
    process groups."""
    needle = f"{name}={value}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes() and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(d.name))
        except (OSError, IndexError):
            continue
    return found


def marked_pids(marker: str) -> list[int]:
    """Processes carrying the deployment marker ``marker``."""
    return pids_with_env(MARKER, marker)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group; one that is already gone (or not ours to signal) is ignored."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
