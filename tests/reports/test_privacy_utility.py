"""The privacy-utility view: ordering, paired cost of privacy, rendering and the plot."""

import json
import math

import numpy as np
import pytest

from fedmm_secure.reports.paired import paired_difference
from fedmm_secure.reports.privacy_utility import (
    plot_utility_curve, setting_epsilon, utility_curve, utility_markdown)


def _summary(seeds, per_method):
    return {"seeds": list(seeds), "auc": {"mean": {m: {"per_seed": list(v)} for m, v in per_method.items()}}}


def test_setting_names_parse_and_bad_ones_are_refused():
    assert setting_epsilon("eps8") == 8.0 and setting_epsilon("eps0.5") == 0.5
    assert math.isinf(setting_epsilon("no_dp"))
    for bad in ("eps", "eps-1", "eps0", "epsx", "8", "none"):
        with pytest.raises(ValueError, match="not a privacy setting name"):
            setting_epsilon(bad)


def test_points_run_by_epsilon_with_no_dp_last_and_cost_is_paired_on_common_seeds():
    free = _summary([0, 1, 2, 3], {"local": [0.80, 0.70, 0.75, 0.72], "fedmm": [0.81, 0.72, 0.76, 0.74]})
    # Seed 3 is missing at epsilon 8, and the seeds come in another order: pairing is by seed.
    eps8 = _summary([2, 0, 1], {"local": [0.70, 0.76, 0.66], "fedmm": [0.73, 0.78, 0.69]})
    eps1 = _summary([0, 1, 2], {"local": [0.60, 0.58, 0.59], "fedmm": [0.61, 0.57, 0.60]})
    pts = utility_curve({"no_dp": free, "eps8": eps8, "eps1": eps1}, methods=["local", "fedmm"])
    assert [(p.setting, p.method) for p in pts] == [
        ("eps1", "local"), ("eps1", "fedmm"), ("eps8", "local"), ("eps8", "fedmm"),
        ("no_dp", "local"), ("no_dp", "fedmm")]
    p = pts[3]   # fedmm at epsilon 8
    expected = paired_difference([0.78, 0.69, 0.73], [0.81, 0.72, 0.76])
    assert p.cost == expected and p.cost.n == 3
    assert p.mean == pytest.approx(np.mean([0.73, 0.78, 0.69]))
    assert p.ci_low < p.mean < p.ci_high
    assert pts[-1].cost is None and math.isinf(pts[-1].epsilon)
    # JSON-ready: strict JSON has no infinity, so no DP's epsilon is null.
    assert json.loads(json.dumps(pts[-1].as_dict(), allow_nan=False))["epsilon"] is None
    assert pts[3].as_dict()["cost"]["n"] == 3 and pts[3].as_dict()["epsilon"] == 8.0


def test_without_a_no_dp_run_there_is_no_cost_and_no_cost_table():
    pts = utility_curve({"eps4": _summary([0, 1], {"local": [0.6, 0.62]})}, methods=["local", "absent"])
    assert len(pts) == 1 and pts[0].cost is None
    text = utility_markdown(pts)
    assert "| 4 | 0.6100 [" in text and "Cost of privacy" not in text


def test_markdown_holds_every_mean_and_cost_and_the_plot_is_written(tmp_path):
    free = _summary([0, 1, 2], {"local": [0.75, 0.74, 0.76]})
    eps8 = _summary([0, 1, 2], {"local": [0.73, 0.73, 0.74]})
    pts = utility_curve({"eps8": eps8, "no_dp": free}, methods=["local"])
    text = utility_markdown(pts)
    assert "| no DP | 0.7500 [" in text and "| 8 | 0.7333 [" in text
    assert "| 8 | -0.0167 [" in text          # paired cost: mean of -0.02, -0.01, -0.02
    out = tmp_path / "pu.png"
    plot_utility_curve(pts, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
