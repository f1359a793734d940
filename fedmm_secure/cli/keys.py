"""``fedmm-secure keys``: long-term identity keys and the identity roster markets pin.

``keys new --out FILE`` makes an Ed25519 identity key (``FILE``, mode 0600) and its public key
(``FILE.pub``); ``keys roster --aggregator AGG.pub --market NAME=NAME.pub ... --out ROSTER``
writes the roster of public keys and prints its SHA-256, the value a market can pin
(``--roster-sha256``) when it is given the digest rather than the file; ``keys digest ROSTER``
prints that digest again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError

__all__ = ["register", "new_command", "roster_command", "digest_command"]


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="long-term identity keys and the roster markets pin before a run")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=type(keys))
    new = ksub.add_parser("new", help="a new identity key: FILE (private, mode 0600) and FILE.pub")
    new.add_argument("--out", required=True, help="where the private key goes (a new file; FILE.pub too)")
    new.set_defaults(handler=new_command)
    ros = ksub.add_parser("roster", help="the identity roster (market -> public key, and the aggregator's)")
    ros.add_argument("--aggregator", required=True, help="the aggregator's public key file (.pub)")
    ros.add_argument("--market", action="append", required=True, metavar="NAME=FILE",
                     help="a market and its public key file (repeat for every market)")
    ros.add_argument("--out", required=True, help="where the roster (JSON) goes (a new file)")
    ros.set_defaults(handler=roster_command)
    dig = ksub.add_parser("digest", help="the SHA-256 of a roster file (what --roster-sha256 pins)")
    dig.add_argument("roster", help="a roster file from `keys roster`")
    dig.set_defaults(handler=digest_command)


def new_command(args: argparse.Namespace) -> int:
    from ..runtime.flower.keyfiles import write_identity_key

    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError("--out", f"{out.parent} is not a directory")
    pub, public = write_identity_key(out)
    print(f"{public.to_openssh()}  ({pub})")
    return 0


def roster_command(args: argparse.Namespace) -> int:
    from ..runtime.flower.keyfiles import read_public_key, write_roster

    markets = {}
    for item in args.market:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--market", f"got {item!r}", allowed="NAME=FILE")
        if name in markets:
            raise ConfigError("--market", f"{name!r} is given twice")
        markets[name] = read_public_key(Path(path))
    out = Path(args.out)
    if out.exists():
        raise ConfigError("--out", f"{out} already exists", allowed="a new file")
    roster = write_roster(out, markets, read_public_key(Path(args.aggregator), flag="--aggregator"))
    print(roster.digest().hex())
    return 0


def digest_command(args: argparse.Namespace) -> int:
    from ..runtime.flower.keyfiles import read_roster

    print(read_roster(Path(args.roster), flag="roster").digest().hex())
    return 0
