"""Reading delimited text files with errors that name the file and the line.

Encoding policy (shared by every loader): files are decoded as strict UTF-8 by default; Latin-1
is accepted only when the caller asks for it (MovieLens' ``u.item``/``movies.dat`` are Latin-1,
the rating and user files are ASCII). Undecodable bytes and NUL bytes (binary files) raise
:class:`DataError` with the line number instead of being silently replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["ENCODINGS", "read_lines", "split_fixed", "parse_column", "where"]

ENCODINGS = ("utf-8", "latin-1")


def where(path: Path | str, line: int) -> str:
    return f"{path}:{line}"


def read_lines(path: Path, *, encoding: str) -> list[str]:
    """Return the file's lines (without line terminators) after the encoding checks."""
    if encoding not in ENCODINGS:
        raise ConfigError("data.encoding", f"unsupported encoding {encoding!r}",
                          allowed=", ".join(ENCODINGS))
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError(f"{where(path, line)}: NUL byte; this is not a text file")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{where(path, line)}: byte 0x{raw[exc.start]:02x} is not valid {encoding}; "
            "re-encode the file as UTF-8 or pass encoding='latin-1' if it is Latin-1"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark is legal and carries no data
    # splitlines() would also split on \x1c, \x85, ... inside fields; only real line ends count.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def split_fixed(
    lines: list[str], *, path: Path, sep: str, width: int, first_line: int = 1
) -> tuple[list[list[str]], np.ndarray]:
    """Columns (lists of strings) of a file with exactly ``width`` ``sep``-separated fields per line.

    ``first_line`` is the 1-based line number of ``lines[0]`` in the file. Empty lines are skipped. Fields are not stripped: numeric parsing tolerates surrounding
    blanks and keys are used verbatim. Built for million-row rating files, hence the joins
    instead of a per-row loop.
    """
    keep = np.fromiter((bool(s) for s in lines), dtype=bool, count=len(lines))
    numbers = np.flatnonzero(keep) + first_line
    rows = [s for s in lines if s]
    if not rows:
        raise DataError(f"{path}: no data rows")
    counts = np.fromiter((s.count(sep) for s in rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(counts != width - 1)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where(path, int(numbers[i]))}: expected {width} {sep!r}-separated fields, "
                        f"got {int(counts[i]) + 1}")
    flat = sep.join(rows).split(sep)
    return [flat[j::width] for j in range(width)], numbers.astype(np.int64)


def parse_column(
    values: list[str] | np.ndarray,
    line_numbers: np.ndarray,
    *,
    path: Path,
    column: str,
    convert: Callable[[np.ndarray], np.ndarray],
    check: Callable[[np.ndarray], np.ndarray] | None = None,
    expected: str,
) -> np.ndarray:
    """Vectorized conversion of one text column; on failure, find and name the first bad line.

    ``convert`` maps a list or array of strings to numbers (raising ValueError on a bad value)
    and ``check`` returns a boolean mask of acceptable parsed values.
    """
    try:
        out = convert(values)
    except (ValueError, TypeError, OverflowError):
        for i, v in enumerate(values):
            try:
                convert(np.asarray([v]))
            except (ValueError, TypeError, OverflowError):
                raise DataError(
                    f"{where(path, int(line_numbers[i]))}: column {column!r}: {str(v)!r} is not {expected}"
                ) from None
        raise DataError(f"{path}: column {column!r} could not be parsed as {expected}") from None
    if check is not None:
        ok = check(out)
        if not np.all(ok):
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(
                f"{where(path, int(line_numbers[i]))}: column {column!r}: {str(values[i])!r} is not {expected}"
            )
    return out


def select_markets(available: list[str], requested: list[str] | None, *, root: Path,
                   missing: Callable[[str], str]) -> list[str]:
    """The markets to load: all of ``available`` or ``requested``, each checked to exist.

    ``missing(name)`` words the error for an absent market (loaders name a file, a folder or a
    region)."""
    names = list(available) if requested is None else list(requested)
    if not names:
        raise DataError(f"{root}: no markets selected")
    for name in names:
        if name not in available:
            raise DataError(f"{missing(name)} (available: {', '.join(available)})")
    return names
