"""MovieLens 100K / 1M loader with markets = regions (first digit of the user's zip code).

Layouts (detected from the folder given):

* 100K: ``u.data`` (tab-separated ``user item rating timestamp``) and ``u.user``
  (``id|age|gender|occupation|zip``, raw age in years, occupation as a word);
* 1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``, age already a bucket code, occupation 0..20).

Markets: ``zip0`` .. ``zip9`` from the first character of the zip code; zip codes that do not
start with a digit (Canadian and other foreign codes, about 1% of users) go to the ``zip_other``
market rather than being dropped, so no user's data disappears silently.

Labels: rating >= 4 is a click (a positive), rating 5 a conversion. Ratings below 4 are not
positives, but they are observed interactions, so those movies are never sampled as the user's
negatives. Labels then follow :mod:`fedmm_secure.data.implicit`.

Local IDs: movies are shared across regions in MovieLens, but the multi-market setting has
disjoint item spaces, so every market numbers its own items (all movies rated in that region,
sorted by movie id) and keeps the movie id in ``item_keys`` for evaluation only. A market's users
are its users with at least one positive. User side features, categorical ints with the same
vocabulary in every market: age bucket (the seven ML-1M buckets; 100K ages are bucketed the same
way), gender (M=0, F=1), occupation (1M codes; for 100K, index in the sorted list of occupation
words found in ``u.user``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .implicit import ImplicitProtocol, build_implicit_market, market_rng
from .market import MarketData
from .textio import parse_column, read_lines, select_markets, split_fixed, where

__all__ = ["AGE_BUCKETS", "market_of_zip", "movielens_variant", "load_movielens"]

# ML-1M age codes: 1 "<18", 18 "18-24", 25 "25-34", 35 "35-44", 45 "45-49", 50 "50-55", 56 "56+".
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)
OTHER_MARKET = "zip_other"


def market_of_zip(zip_code: str) -> str:
    z = zip_code.strip()
    return f"zip{z[0]}" if z[:1].isdigit() and z[:1].isascii() else OTHER_MARKET


@dataclass(frozen=True)
class _Users:
    ids: np.ndarray         # int64 sorted user ids
    features: np.ndarray    # int64 (n, 3): age bucket, gender, occupation
    market: np.ndarray      # str market name
    cards: tuple[int, int, int]


@dataclass(frozen=True)
class _Ratings:
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray
    line: np.ndarray


def movielens_variant(root: Path) -> str:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a MovieLens folder)")
    if (root / "u.data").exists() or (root / "u.user").exists():
        return "100k"
    if (root / "ratings.dat").exists() or (root / "users.dat").exists():
        return "1m"
    raise DataError(f"{root}: neither MovieLens 100K (u.data, u.user) nor 1M (ratings.dat, users.dat) files found")


def _split_rows(path: Path, *, sep: str, width: int, encoding: str) -> tuple[list[list[str]], np.ndarray]:
    return split_fixed(read_lines(path, encoding=encoding), path=path, sep=sep, width=width)


def _int_col(table, line, j, path, column, lo=None, hi=None) -> np.ndarray:
    def check(v):
        ok = np.ones(v.shape, bool)
        if lo is not None:
            ok &= v >= lo
        if hi is not None:
            ok &= v <= hi
        return ok
    bounds = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
    return parse_column(table[j], line, path=path, column=column, expected=f"an integer{bounds}",
                        convert=lambda a: np.asarray(a, dtype=np.int64), check=check)


def _read_users(root: Path, variant: str, encoding: str) -> _Users:
    if variant == "100k":
        path, sep = root / "u.user", "|"
        cols = {"id": 0, "age": 1, "gender": 2, "occupation": 3, "zip": 4}
    else:
        path, sep = root / "users.dat", "::"
        cols = {"id": 0, "gender": 1, "age": 2, "occupation": 3, "zip": 4}
    table, line = _split_rows(path, sep=sep, width=5, encoding=encoding)
    ids = _int_col(table, line, cols["id"], path, "id", lo=1)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1][0]
        second = np.flatnonzero(ids == dup)[1]
        raise DataError(f"{where(path, int(line[second]))}: user {dup} listed twice")
    gender_s = np.asarray(table[cols["gender"]], dtype=str)
    bad = ~np.isin(gender_s, ["M", "F"])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(path, int(line[i]))}: gender {str(gender_s[i])!r} is not 'M' or 'F'")
    gender = (gender_s == "F").astype(np.int64)
    if variant == "100k":
        age = _int_col(table, line, cols["age"], path, "age", lo=0, hi=150)
        # Bucket i covers [AGE_BUCKETS[i], AGE_BUCKETS[i+1]), with < 18 in bucket 0.
        age_bucket = np.searchsorted(np.asarray(AGE_BUCKETS), age, side="right") - 1
        age_bucket = np.maximum(age_bucket, 0)
        occ_s = np.asarray(table[cols["occupation"]], dtype=str)
        if np.any(occ_s == ""):
            i = int(np.flatnonzero(occ_s == "")[0])
            raise DataError(f"{where(path, int(line[i]))}: empty occupation")
        vocab, occupation = np.unique(occ_s, return_inverse=True)
        n_occ = len(vocab)
    else:
        age_code = _int_col(table, line, cols["age"], path, "age")
        bad = ~np.isin(age_code, AGE_BUCKETS)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where(path, int(line[i]))}: age code {age_code[i]} is not one of {AGE_BUCKETS}")
        age_bucket = np.searchsorted(np.asarray(AGE_BUCKETS), age_code)
        occupation = _int_col(table, line, cols["occupation"], path, "occupation", lo=0, hi=20)
        n_occ = 21
    market = np.asarray([market_of_zip(z) for z in table[cols["zip"]]], dtype=str)
    feats = np.stack([age_bucket, gender, occupation], axis=1).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    return _Users(ids=ids[order], features=feats[order], market=market[order],
                  cards=(len(AGE_BUCKETS), 2, int(n_occ)))


def _read_ratings(root: Path, variant: str, encoding: str) -> tuple[Path, _Ratings]:
    if variant == "100k":
        path, sep = root / "u.data", "\t"
    else:
        path, sep = root / "ratings.dat", "::"
    table, line = _split_rows(path, sep=sep, width=4, encoding=encoding)
    return path, _Ratings(
        user=_int_col(table, line, 0, path, "user", lo=1),
        item=_int_col(table, line, 1, path, "item", lo=1),
        rating=_int_col(table, line, 2, path, "rating", lo=1, hi=5),
        time=_int_col(table, line, 3, path, "timestamp", lo=0),
        line=line,
    )


def load_movielens(
    root: str | Path,
    *,
    seed: int,
    markets: list[str] | None = None,
    protocol: ImplicitProtocol = ImplicitProtocol(),
    encoding: str = "utf-8",
) -> list[MarketData]:
    """Load MovieLens regions as markets, sorted by name (``zip0``..``zip9``, ``zip_other``)."""
    root = Path(root)
    variant = movielens_variant(root)
    users = _read_users(root, variant, encoding)
    rpath, r = _read_ratings(root, variant, encoding)
    pos = np.searchsorted(users.ids, r.user)
    pos_c = np.minimum(pos, len(users.ids) - 1)
    unknown = users.ids[pos_c] != r.user
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(f"{where(rpath, int(r.line[i]))}: user {r.user[i]} is not in the users file")
    row_market = users.market[pos_c]
    available = sorted(set(row_market.tolist()))
    names = select_markets(available, markets, root=root,
                           missing=lambda name: f"{root}: no ratings for market {name!r}")
    click = r.rating >= 4
    out = []
    for name in names:
        rows = np.flatnonzero(row_market == name)
        pos_rows = rows[click[rows]]
        neg_rows = rows[~click[rows]]
        if len(pos_rows) == 0:
            raise DataError(f"{rpath}: market {name!r} has no ratings >= 4 (empty market)")
        item_keys, item_local = np.unique(r.item[rows], return_inverse=True)
        user_keys, u_pos = np.unique(r.user[pos_rows], return_inverse=True)
        i_pos = item_local[click[rows]]
        # Low-rated pairs of users without any positive are irrelevant: those users are dropped.
        j = np.searchsorted(user_keys, r.user[neg_rows])
        jc = np.minimum(j, len(user_keys) - 1)
        has_pos = user_keys[jc] == r.user[neg_rows]
        feats = users.features[np.searchsorted(users.ids, user_keys)]
        out.append(build_implicit_market(
            name,
            users=u_pos, items=i_pos, times=r.time[pos_rows], conversion=r.rating[pos_rows] == 5,
            n_users=len(user_keys), n_items=len(item_keys),
            protocol=protocol, rng=market_rng(seed, name),
            also_interacted=(jc[has_pos], item_local[~click[rows]][has_pos]),
            user_features=feats, user_feature_cards=users.cards,
            item_keys=item_keys,
            meta={"source": f"movielens-{variant}", "path": str(root), "raw_rows": int(len(rows)),
                  "users_without_positives": int(len(np.unique(r.user[rows])) - len(user_keys)),
                  "click_rule": "rating >= 4", "conversion_rule": "rating == 5",
                  "user_feature_names": ("age_bucket", "gender", "occupation")},
        ))
    return out
