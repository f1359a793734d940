"""AliExpress (multi-country CTR/CVR) loader: impression-level rows with explicit labels.

CSV header: ``search_id, categorical_1..categorical_16, numerical_1..numerical_63, click,
conversion`` (extra columns are ignored; column order is free). One market per country, in
either layout of the folder given:

* ``<country>/train.csv`` and ``<country>/test.csv`` (the public release, e.g.
  ``AliExpress_NL/``; a leading ``AliExpress_`` is stripped from the market name). Validation is
  a seeded ``valid_fraction`` of the training *search sessions*;
* ``<country>.csv``: one file per country, split into train / valid / test by a seeded partition
  of search sessions (``valid_fraction``, ``test_fraction``).

Splitting by session keeps all impressions of one search on the same side.

Mapping (the data has no user id): a *user* is a search session (``search_id``) and an *item*
is the value of ``item_column`` (``categorical_1`` by default; pass another column if you know
which one identifies the product). Labels are the explicit ``click`` and ``conversion`` columns,
no negative sampling; a conversion without a click is rejected. There is no ranking set.

Per-impression features do not fit the per-user / per-item side-feature tables, so they are in
``meta``: ``meta["row_features"][split]`` is an int64 (rows, 15 + 63) matrix holding the other
categorical columns (vocabulary built on TRAIN only, index 0 = unseen value) followed by the
numerical columns bucketized into ``numerical_bins`` quantile bins whose edges are computed on
TRAIN only; ``meta["row_feature_cards"]`` and ``meta["row_feature_names"]`` describe the
columns, and ``meta["numerical"][split]`` keeps the raw float32 values.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .implicit import market_rng
from .market import MarketData, MarketSplit
from .textio import parse_column, read_lines, select_markets, split_fixed, where

__all__ = ["CATEGORICAL", "NUMERICAL", "aliexpress_layout", "read_aliexpress_csv", "load_aliexpress"]

CATEGORICAL = tuple(f"categorical_{j}" for j in range(1, 17))
NUMERICAL = tuple(f"numerical_{j}" for j in range(1, 64))
REQUIRED = ("search_id", *CATEGORICAL, *NUMERICAL, "click", "conversion")


@dataclass(frozen=True)
class _Table:
    """Parsed CSV: string keys and categoricals, float numericals, 0/1 labels, line numbers."""

    path: Path
    search: np.ndarray  # str (n,)
    cat: np.ndarray     # str (n, 16)
    num: np.ndarray     # float32 (n, 63)
    click: np.ndarray   # float32 (n,)
    conv: np.ndarray    # float32 (n,)
    line: np.ndarray    # int64 (n,)

    def take(self, idx: np.ndarray) -> "_Table":
        return _Table(self.path, self.search[idx], self.cat[idx], self.num[idx], self.click[idx],
                      self.conv[idx], self.line[idx])

    def __len__(self) -> int:
        return len(self.search)


def _csv_columns(lines: list[str], path: Path, first: int, width: int) -> tuple[list[list[str]], np.ndarray]:
    """Slow path for files with quoted fields: the csv module, row by row."""
    reader = csv.reader(io.StringIO("\n".join(lines[first:])), strict=True)
    rows: list[list[str]] = []
    numbers: list[int] = []
    try:
        for parts in reader:
            n = reader.line_num + first
            if not parts or (len(parts) == 1 and not parts[0]):
                continue
            if len(parts) != width:
                raise DataError(f"{where(path, n)}: expected {width} ','-separated fields, got {len(parts)}")
            rows.append(parts)
            numbers.append(n)
    except csv.Error as exc:
        raise DataError(f"{where(path, reader.line_num + first)}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return [list(c) for c in zip(*rows)], np.asarray(numbers, dtype=np.int64)


def read_aliexpress_csv(path: Path, *, encoding: str = "utf-8") -> _Table:
    path = Path(path)
    lines = read_lines(path, encoding=encoding)
    header_at = next((n for n, s in enumerate(lines) if s.strip()), None)
    if header_at is None:
        raise DataError(f"{path}: empty file (expected a header with {', '.join(REQUIRED[:2])}, ...)")
    try:
        header = [h.strip() for h in next(csv.reader([lines[header_at]], strict=True))]
    except csv.Error as exc:
        raise DataError(f"{where(path, header_at + 1)}: malformed CSV header ({exc})") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{where(path, header_at + 1)}: header lacks column(s) {shown}")
    width = len(header)
    body = lines[header_at + 1:]
    if any('"' in s for s in body):
        columns, line = _csv_columns(lines, path, header_at + 1, width)
    else:
        # No quoting anywhere: a plain split is exact and far faster than the csv module.
        columns, line = split_fixed(body, path=path, sep=",", width=width, first_line=header_at + 2)
    columns = [columns[header.index(c)] for c in REQUIRED]
    keys = [np.asarray(c, dtype=str) for c in columns[: 1 + len(CATEGORICAL)]]
    for j, col in enumerate(keys):
        empty = np.flatnonzero(np.char.str_len(col) == 0)
        if len(empty):
            raise DataError(f"{where(path, int(line[empty[0]]))}: column {REQUIRED[j]!r} is empty")
    n = len(line)
    num = np.empty((n, len(NUMERICAL)), dtype=np.float32)
    for j, name in enumerate(NUMERICAL):
        num[:, j] = parse_column(columns[17 + j], line, path=path, column=name, expected="a finite number",
                                 convert=lambda a: np.asarray(a, dtype=np.float64), check=np.isfinite)
    labels = []
    for j, name in ((-2, "click"), (-1, "conversion")):
        labels.append(parse_column(columns[j], line, path=path, column=name, expected="0 or 1",
                                   convert=lambda a: np.asarray(a, dtype=np.float64),
                                   check=lambda v: (v == 0) | (v == 1)).astype(np.float32))
    click, conv = labels
    bad = (conv > 0) & (click <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(path, int(line[i]))}: conversion without a click (conversions are post-click)")
    return _Table(path, keys[0], np.stack(keys[1:], axis=1), num, click, conv, line)


def aliexpress_layout(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """Market name -> (train or single file, test file or None)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected <country>/train.csv or <country>.csv files)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train.csv").is_file())
    files = sorted(p for p in root.glob("*.csv") if p.is_file())
    if subdirs and files:
        raise DataError(f"{root}: mixes <country>/train.csv folders and <country>.csv files; use one layout")
    found: dict[str, tuple[Path, Path | None]] = {}
    for d in subdirs:
        name = d.name[len("AliExpress_"):] if d.name.startswith("AliExpress_") else d.name
        if not (d / "test.csv").is_file():
            raise DataError(f"{d / 'test.csv'}: missing (each country folder needs train.csv and test.csv)")
        found[name] = (d / "train.csv", d / "test.csv")
    for f in files:
        found[f.stem] = (f, None)
    if not found:
        raise DataError(f"{root}: no AliExpress market found (<country>/train.csv+test.csv or <country>.csv)")
    return found


def _session_split(search: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices per part, assigning whole sessions (sorted keys, then a seeded permutation)."""
    keys, inv = np.unique(search, return_inverse=True)
    perm = rng.permutation(len(keys))
    cuts = np.floor(np.cumsum(fractions) * len(keys)).astype(np.int64)
    part_of_key = np.zeros(len(keys), dtype=np.int64)
    for c in cuts:
        part_of_key[perm[c:]] += 1
    part = part_of_key[inv]
    return [np.flatnonzero(part == p) for p in range(len(fractions) + 1)]


def _encode_categorical(train: np.ndarray, other: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], int]:
    vocab = np.unique(train)
    def enc(col):
        pos = np.searchsorted(vocab, col)
        posc = np.minimum(pos, len(vocab) - 1)
        return np.where(vocab[posc] == col, posc + 1, 0).astype(np.int64)
    return enc(train), [enc(c) for c in other], len(vocab) + 1


def _bucketize(train: np.ndarray, other: list[np.ndarray], bins: int) -> tuple[np.ndarray, list[np.ndarray]]:
    edges = np.unique(np.quantile(train.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    def enc(col):
        return np.searchsorted(edges, col, side="right").astype(np.int64)
    return enc(train), [enc(c) for c in other]


def load_aliexpress(
    root: str | Path,
    *,
    seed: int,
    markets: list[str] | None = None,
    item_column: str = "categorical_1",
    numerical_bins: int = 8,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    encoding: str = "utf-8",
) -> list[MarketData]:
    if item_column not in CATEGORICAL:
        raise ConfigError("data.item_column", f"got {item_column!r}", allowed="categorical_1 .. categorical_16")
    if not isinstance(numerical_bins, int) or numerical_bins < 2:
        raise ConfigError("data.numerical_bins", f"got {numerical_bins!r}", allowed="an integer >= 2")
    if not (0 < valid_fraction < 0.5 and 0 < test_fraction < 0.5):
        raise ConfigError("data.valid_fraction", "valid and test fractions must be in (0, 0.5)")
    root = Path(root)
    layout = aliexpress_layout(root)
    available = sorted(layout)
    names = select_markets(available, markets, root=root, missing=lambda name: f"{root}: no market {name!r}")
    item_j = CATEGORICAL.index(item_column)
    feat_js = [j for j in range(len(CATEGORICAL)) if j != item_j]
    out = []
    for name in names:
        rng = market_rng(seed, name)
        first, test_path = layout[name]
        t = read_aliexpress_csv(first, encoding=encoding)
        if test_path is not None:
            tr_idx, va_idx = _session_split(t.search, (1 - valid_fraction,), rng)
            parts = [t.take(tr_idx), t.take(va_idx), read_aliexpress_csv(test_path, encoding=encoding)]
        else:
            idx = _session_split(t.search, (1 - valid_fraction - test_fraction, valid_fraction), rng)
            parts = [t.take(i) for i in idx]
        for part, split in zip(parts, ("train", "test")):
            if len(part) == 0:
                raise DataError(f"{first}: market {name!r} has an empty {split} split (too few search sessions)")
        user_keys = np.unique(np.concatenate([p.search for p in parts]))
        item_keys = np.unique(np.concatenate([p.cat[:, item_j] for p in parts]))
        splits = [
            MarketSplit(users=np.searchsorted(user_keys, p.search).astype(np.int64),
                        items=np.searchsorted(item_keys, p.cat[:, item_j]).astype(np.int64),
                        click=p.click, conversion=p.conv)
            for p in parts
        ]
        tr, others = parts[0], parts[1:]
        cat_cols, cards, feat_names = [], [], []
        for j in feat_js:
            enc_tr, enc_other, card = _encode_categorical(tr.cat[:, j], [p.cat[:, j] for p in others])
            cat_cols.append([enc_tr, *enc_other])
            cards.append(card)
            feat_names.append(CATEGORICAL[j])
        for j, nm in enumerate(NUMERICAL):
            enc_tr, enc_other = _bucketize(tr.num[:, j], [p.num[:, j] for p in others], numerical_bins)
            cat_cols.append([enc_tr, *enc_other])
            cards.append(numerical_bins)
            feat_names.append(nm)
        row_features = {s: np.stack([c[k] for c in cat_cols], axis=1)
                        for k, s in enumerate(("train", "valid", "test"))}
        out.append(MarketData(
            name=name, n_users=len(user_keys), n_items=len(item_keys),
            train=splits[0], valid=splits[1], test=splits[2],
            item_keys=item_keys,
            meta={"source": "aliexpress", "path": str(first.parent if test_path else first),
                  "raw_rows": int(sum(len(p) for p in parts)),
                  "user_column": "search_id", "item_column": item_column,
                  "row_features": row_features, "row_feature_cards": tuple(cards),
                  "row_feature_names": tuple(feat_names),
                  "numerical": {s: p.num for s, p in zip(("train", "valid", "test"), parts)}},
        ))
    return out
