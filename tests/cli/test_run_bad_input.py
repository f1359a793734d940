"""Every bad input to `run` / `bench`: one line on stderr, exit code 2, nothing written."""

import json

import pytest

from fedmm_secure.cli import main

from .test_run import TINY


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags, field", [
    (["--epsilon", "nan"], "privacy.epsilon"),
    (["--epsilon", "inf"], "privacy.epsilon"),
    (["--no-dp", "--epsilon", "8"], "privacy.epsilon"),
    (["--epsilon", "8", "--noise-multiplier", "1"], "privacy.noise_multiplier"),
    (["--epsilon", "8", "--epsilon-budget", "5"], "privacy.epsilon"),
    (["--data", "xmrec:/nonexistent/dir"], "nonexistent"),
])
def test_bad_run_flags_exit_2_and_leave_no_directory(flags, field, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", *flags, "--out", str(out), "--quiet"]) == 2
    assert field in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("privacy, field", [
    ({"embedding_noise": "sparse", "sparse_selection_share": 1.5}, "privacy.sparse_selection_share"),
    ({"embedding_noise": "sparse", "sparse_threshold": "high"}, "privacy.sparse_threshold"),
    ({"embedding_noise": "half"}, "privacy.embedding_noise"),
])
def test_bad_sparse_noise_settings_exit_2_with_one_line(privacy, field, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "privacy": privacy}))
    out = tmp_path / "never"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert field in _one_error_line(capsys)
    assert not out.exists()


def test_out_that_is_a_file_or_holds_results_is_refused_before_work(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "--out", str(f), "--quiet"]) == 2
    assert "not a directory" in _one_error_line(capsys)
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text("{}")
    assert main(["run", "--out", str(done), "--quiet"]) == 2
    assert "already holds" in _one_error_line(capsys)
    assert (done / "results.json").read_text() == "{}"


def test_bench_out_in_a_missing_directory_is_refused_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import fedmm_secure.benchmarks as b
    monkeypatch.setattr(b, "bench_masking", lambda **kw: pytest.fail("benchmark ran before the path check"))
    assert main(["bench", "secagg", "--quick", "--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("fedmm-secure ")


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({**TINY, "methods": ["local"]}))
    return p


def test_run_without_privacy_flags_is_private_and_resume_refuses_a_finished_run(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["run", "--config", str(tiny), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["privacy"]["enabled"] and res["config"]["privacy"]["epsilon"] == 8.0
    assert all(v["epsilon"] <= 8.0 for v in res["privacy"].values())
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "finished run" in _one_error_line(capsys)
    assert main(["run", "--resume", str(out), "--epsilon", "4", "--quiet"]) == 2
    assert "--epsilon" in _one_error_line(capsys)
    assert (out / "results.json").read_bytes() == before


def test_refused_rounds_are_said_and_fail_on_skip_exits_1(tmp_path, tiny, capsys):
    # A tight budget with a fixed noise multiplier: later rounds are refused by every market.
    args = ["run", "--config", str(tiny), "--noise-multiplier", "0.6", "--epsilon-budget", "2",
            "--rounds", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "REFUSED by the budget" in captured.out
    assert "refused by its budget" in captured.err   # logged as it happened
    assert main([*args, "--out", str(tmp_path / "b"), "--fail-on-skip"]) == 1


def test_bench_secagg_prints_a_table_and_writes_the_json(tmp_path, capsys, monkeypatch):
    # Real measurements, at sizes that take a second; the terminal gets the table, not JSON.
    import fedmm_secure.benchmarks as b
    from fedmm_secure.benchmarks.masking import floor_ratios, shamir_timings
    small = {"backend": "masking", "floor_ratios": floor_ratios(3, 4096, repeats=1),
             "shamir": shamir_timings(n=10, repeats=1)}
    monkeypatch.setattr(b, "bench_masking", lambda **kw: small)
    ckks = pytest.importorskip("fedmm_secure.benchmarks.ckks")
    monkeypatch.setattr(ckks, "bench_ckks", lambda **kw: {"skipped": "not measured in this test"})
    out = tmp_path / "bench.json"
    assert main(["bench", "secagg", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["metric", "ours"] and "target" in lines[0]
    assert any(line.startswith("masking aggregator round, n=3 d=4,096, CPU") for line in lines)
    assert "{" not in text
    saved = json.loads(out.read_text())
    assert saved["masking"]["floor_ratios"]["n"] == 3 and "ckks" in saved
