"""Output paths checked before a command does its work, so a typo costs a second, not a run."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

__all__ = ["check_output_dir", "check_output_file"]


def check_output_file(path: Path, *, flag: str) -> None:
    """``path`` can be written: its directory exists and is writable, and it is not a directory."""
    if path.is_dir():
        raise ConfigError(flag, f"{path} is a directory", allowed="a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(flag, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(flag, f"directory {parent} is not writable")


def check_output_dir(path: Path, *, flag: str) -> None:
    """``path`` is, or can become, a directory: not an existing file, under a writable parent."""
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} exists and is not a directory", allowed="a new or existing directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ConfigError(flag, f"{probe} is not writable")
