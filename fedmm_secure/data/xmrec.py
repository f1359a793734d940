"""XMRec / XMarket loader: one ``<market>.txt`` per market, header ``userId itemId rate date``.

Every row is an observed interaction (a review), hence a positive click. The conversion label,
used by the multi-task (CTR/CTCVR) models, is ``rate == 5`` on a clicked row: a five-star rating
stands in for "bought and satisfied". Labels then follow :mod:`fedmm_secure.data.implicit`.

Users and items get local IDs 0..n-1 per market (sorted by original key, so IDs are stable); the
original item IDs (ASINs) are kept in ``item_keys`` for evaluation-only alignment checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .implicit import ImplicitProtocol, build_implicit_market, market_rng
from .market import MarketData
from .textio import parse_column, read_lines, select_markets, where

__all__ = ["XMRecRows", "read_xmrec_file", "xmrec_market_names", "load_xmrec"]

REQUIRED = ("userId", "itemId", "rate", "date")


@dataclass(frozen=True)
class XMRecRows:
    """Parsed rows of one market file, in file order."""

    users: np.ndarray   # str keys
    items: np.ndarray   # str keys
    rate: np.ndarray    # float64 in [1, 5]
    day: np.ndarray     # int64 days since 1970-01-01
    line: np.ndarray    # int64 1-based line numbers


def _to_day(a: np.ndarray) -> np.ndarray:
    # Only full ISO dates: numpy would silently read "2015" as 2015-01-01.
    a = np.asarray(a, dtype=str)
    if not np.all(np.char.str_len(a) == 10):
        raise ValueError("not YYYY-MM-DD")
    d = a.astype("datetime64[D]")
    if np.any(np.isnat(d)):
        raise ValueError("NaT")
    return d.astype(np.int64)


def read_xmrec_file(path: Path, *, encoding: str = "utf-8") -> XMRecRows:
    path = Path(path)
    lines = read_lines(path, encoding=encoding)
    header_at = next((n for n, s in enumerate(lines) if s.strip()), None)
    if header_at is None:
        raise DataError(f"{path}: empty file (expected header {' '.join(REQUIRED)!r})")
    header = lines[header_at].split()
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"{where(path, header_at + 1)}: header lacks column(s) {', '.join(missing)} "
                        f"(expected {' '.join(REQUIRED)!r})")
    if len(set(header)) != len(header):
        raise DataError(f"{where(path, header_at + 1)}: duplicate column names in header")
    width = len(header)
    cols = [header.index(c) for c in REQUIRED]
    fields: list[list[str]] = []
    numbers: list[int] = []
    for n in range(header_at + 1, len(lines)):
        parts = lines[n].split()
        if not parts:
            continue  # blank lines (a trailing newline above all) carry nothing
        if len(parts) != width:
            raise DataError(f"{where(path, n + 1)}: expected {width} space-separated fields, got {len(parts)}")
        fields.append([parts[c] for c in cols])
        numbers.append(n + 1)
    if not fields:
        raise DataError(f"{path}: no data rows after the header (empty market)")
    table = np.asarray(fields, dtype=str)
    line = np.asarray(numbers, dtype=np.int64)
    rate = parse_column(
        table[:, 2], line, path=path, column="rate", expected="a rating in [1, 5]",
        convert=lambda a: np.asarray(a, dtype=np.float64), check=lambda r: np.isfinite(r) & (r >= 1) & (r <= 5),
    )
    day = parse_column(table[:, 3], line, path=path, column="date", expected="a date YYYY-MM-DD",
                       convert=_to_day)
    return XMRecRows(users=table[:, 0], items=table[:, 1], rate=rate, day=day, line=line)


def xmrec_market_names(root: Path) -> list[str]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a folder of <market>.txt files)")
    names = sorted(p.stem for p in root.glob("*.txt") if p.is_file())
    if not names:
        raise DataError(f"{root}: no <market>.txt files found")
    return names


def load_xmrec(
    root: str | Path,
    *,
    seed: int,
    markets: list[str] | None = None,
    protocol: ImplicitProtocol = ImplicitProtocol(),
    encoding: str = "utf-8",
) -> list[MarketData]:
    """Load the markets in ``root`` (all ``*.txt`` files, sorted by name, unless ``markets``)."""
    root = Path(root)
    available = xmrec_market_names(root)
    names = select_markets(available, markets, root=root,
                           missing=lambda name: f"{root / (name + '.txt')}: no such market file")
    out = []
    for name in names:
        path = root / f"{name}.txt"
        rows = read_xmrec_file(path, encoding=encoding)
        user_keys, users = np.unique(rows.users, return_inverse=True)
        item_keys, items = np.unique(rows.items, return_inverse=True)
        out.append(build_implicit_market(
            name,
            users=users, items=items, times=rows.day, conversion=rows.rate == 5,
            n_users=len(user_keys), n_items=len(item_keys),
            protocol=protocol, rng=market_rng(seed, name),
            item_keys=item_keys,
            meta={"source": "xmrec", "path": str(path), "raw_rows": int(len(rows.users)),
                  "conversion_rule": "rate == 5"},
        ))
    return out
