"""``fedmm-secure keys``: key files, the roster and its digest from the command line."""

from __future__ import annotations

import os

import pytest

from fedmm_secure.cli import main
from fedmm_secure.runtime.flower.keyfiles import read_identity_key, read_roster


def test_keys_new_roster_digest(tmp_path, capsys):
    for party in ("agg", "US", "DE", "FR"):
        assert main(["keys", "new", "--out", str(tmp_path / party)]) == 0
        assert os.stat(tmp_path / party).st_mode & 0o777 == 0o600
        assert capsys.readouterr().out.startswith("ssh-ed25519 ")
    args = ["keys", "roster", "--aggregator", str(tmp_path / "agg.pub"), "--out", str(tmp_path / "roster.json")]
    for m in ("US", "DE", "FR"):
        args += ["--market", f"{m}={tmp_path / m}.pub"]
    assert main(args) == 0
    digest = capsys.readouterr().out.strip()
    roster = read_roster(tmp_path / "roster.json")
    assert digest == roster.digest().hex()
    assert roster.markets["DE"] == read_identity_key(tmp_path / "DE").public_key()
    assert roster.aggregator == read_identity_key(tmp_path / "agg").public_key()
    assert main(["keys", "digest", str(tmp_path / "roster.json")]) == 0
    assert capsys.readouterr().out.strip() == digest


@pytest.mark.parametrize("argv, needle", [
    (["keys", "new", "--out", "{d}/missing-dir/k"], "not a directory"),
    (["keys", "new", "--out", "{d}/exists"], "already exists"),
    (["keys", "roster", "--aggregator", "{d}/nope.pub", "--market", "US={d}/exists.pub",
      "--out", "{d}/r.json"], "does not exist"),
    (["keys", "roster", "--aggregator", "{d}/exists.pub", "--market", "US", "--out", "{d}/r.json"], "NAME=FILE"),
    (["keys", "roster", "--aggregator", "{d}/exists.pub", "--market", "US={d}/exists.pub",
      "--out", "{d}/r.json"], "share one identity key"),
    (["keys", "roster", "--aggregator", "{d}/exists.pub", "--market", "US={d}/exists",
      "--out", "{d}/r.json"], "not an OpenSSH public key"),
    (["keys", "digest", "{d}/exists.pub"], "not JSON"),
])
def test_bad_key_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    assert main(["keys", "new", "--out", str(tmp_path / "exists")]) == 0
    capsys.readouterr()
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
