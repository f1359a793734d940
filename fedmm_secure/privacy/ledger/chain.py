"""The hash chain over the ledger's entries, and the signed head.

Every row the ledger writes, in any table, is one *entry* of a single append-only sequence;
its ``id`` is its index in that sequence. Entry ``i`` stores

    prev_hash_i = hash_{i-1}     (GENESIS_PREV for the first entry)
    hash_i      = SHA-256(ENTRY_LABEL || prev_hash_i || canonical(table, i, content))

where ``canonical`` is JSON with sorted keys and no whitespace over the table name, the index and
the row's content columns (schema.COLUMNS), every value typed by its column: integers as JSON
integers, reals as ``float.hex`` strings (exact, and defined for infinities), text as JSON
strings. The label and the previous hash have fixed lengths, so the concatenation is
unambiguous. The first entry is the ``runs`` row that creates the ledger: it holds the run
configuration's hash, a random run id and the signer's public key, so the whole chain commits
to them.

A *head* is (count, hash of entry count-1). With a market's Ed25519 identity key the ledger
signs its head at every round commit and when the run finishes, over HEAD_LABEL and the
canonical JSON of (run id, count, head hash, kind).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from .schema import COLUMNS

__all__ = [
    "GENESIS_PREV",
    "ENTRY_LABEL",
    "HEAD_LABEL",
    "coerce",
    "encode_value",
    "canonical_entry",
    "entry_hash",
    "head_message",
    "is_hash",
]

GENESIS_PREV = "0" * 64
ENTRY_LABEL = b"fedmm-secure/privacy-ledger/v2/entry\x00"
HEAD_LABEL = b"fedmm-secure/privacy-ledger/v2/signed-head\x00"


def coerce(kind: str, value: Any) -> Any:
    """The Python value the ledger writes for a column of ``kind``: exactly what SQLite gives
    back when the row is read, so the hash computed at write time is reproducible."""
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    if base == "int":
        return int(value)
    if base == "real":
        x = float(value)
        # SQLite stores -0.0 as 0.0; hash what it will return.
        return 0.0 if x == 0.0 else x
    if base == "text":
        return str(value)
    raise ValueError(f"unknown column kind {kind!r}")


def encode_value(kind: str, value: Any) -> int | str | None:
    """A column value as it enters the canonical encoding. Raises ValueError when the stored
    value does not have the column's type (a row rewritten outside the ledger)."""
    if value is None:
        if kind.endswith("?"):
            return None
        raise ValueError("NULL in a NOT NULL column")
    base = kind.rstrip("?")
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "real" and isinstance(value, float):
        return float.hex(value)
    if base == "text" and isinstance(value, str):
        return value
    raise ValueError(f"{type(value).__name__} value in a {base} column")


def canonical_entry(table: str, index: int, values: Mapping[str, Any]) -> bytes:
    """The bytes the entry's hash covers: table, index and every content column, typed."""
    content = {name: encode_value(kind, values[name]) for name, kind in COLUMNS[table]}
    doc = {"table": table, "index": index, "content": content}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def entry_hash(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(ENTRY_LABEL + bytes.fromhex(prev_hash) + content).hexdigest()


def head_message(run_id: str, count: int, head_hash: str, kind: str) -> bytes:
    """What a signed head's signature covers. The run id binds it to this ledger, the count and
    hash to this exact prefix of the chain, the kind to a round commit or the run's finish."""
    doc = {"run_id": run_id, "count": int(count), "head": head_hash, "kind": kind}
    return HEAD_LABEL + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def is_hash(value: object) -> bool:
    """A lower-case hex SHA-256 digest (what ``prev_hash`` and ``hash`` hold)."""
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))
