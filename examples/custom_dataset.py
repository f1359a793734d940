"""Plug your own market data into a private, securely aggregated FedMM run.

Your logs, one CSV per market (``<market>.csv`` with ``user,item,click,conversion``), become a
dataset named ``shoplogs`` with ``fedmm_secure.register_dataset``; a run config then names it
``data: "shoplogs:/path/to/logs"``, exactly like the built-in ``xmrec:PATH``. The run trains
FedMM with DP-SGD (every market's epsilon accounted on the privacy ledger) and sums everything
that crosses market boundaries with pairwise-mask secure aggregation.

    python examples/custom_dataset.py            # writes demo logs to a temporary folder
    python examples/custom_dataset.py --small    # what the test suite runs
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import fedmm_secure as fm


@fm.register_dataset("shoplogs")
def load_shoplogs(path: Path, *, seed: int, markets: list[str] | None, test_fraction: float = 0.2
                  ) -> list[fm.MarketData]:
    """One market per ``*.csv`` in ``path``. User and item keys are numbered per market
    (disjoint ID spaces), the item keys are kept for evaluation only, and the split is over
    distinct (user, item) pairs so that no pair is in two splits."""
    rng = np.random.default_rng(seed)
    out = []
    for file in sorted(path.glob("*.csv")):
        name = file.stem
        if markets is not None and name not in markets:
            continue
        with file.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        user_keys = sorted({r["user"] for r in rows})
        item_keys = sorted({r["item"] for r in rows})
        uid = {k: i for i, k in enumerate(user_keys)}
        iid = {k: i for i, k in enumerate(item_keys)}
        users = np.array([uid[r["user"]] for r in rows], np.int64)
        items = np.array([iid[r["item"]] for r in rows], np.int64)
        click = np.array([float(r["click"]) for r in rows], np.float32)
        conv = np.array([float(r["conversion"]) for r in rows], np.float32)
        pairs, pair_of_row = np.unique(users * len(item_keys) + items, return_inverse=True)
        where = rng.permutation(len(pairs))   # split position of each pair
        n_test, n_valid = int(test_fraction * len(pairs)), int(0.1 * len(pairs))
        part = np.where(where[pair_of_row] < n_test, 2, np.where(where[pair_of_row] < n_test + n_valid, 1, 0))
        full = fm.MarketSplit(users, items, click, conv)
        out.append(fm.MarketData(
            name=name, n_users=len(user_keys), n_items=len(item_keys),
            train=full.subset(np.flatnonzero(part == 0)), valid=full.subset(np.flatnonzero(part == 1)),
            test=full.subset(np.flatnonzero(part == 2)), item_keys=np.array(item_keys)))
    return out


def write_demo_logs(folder: Path, *, users: int, seed: int = 0) -> Path:
    """Made-up logs of three markets that list overlapping catalogues (shared product keys)."""
    rng = np.random.default_rng(seed)
    catalogue = [f"sku{i:04d}" for i in range(120)]
    taste = rng.normal(size=(len(catalogue), 4))
    for m, market in enumerate(("de", "fr", "it")):
        listed = rng.choice(len(catalogue), size=80, replace=False)
        with (folder / f"{market}.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["user", "item", "click", "conversion"])
            for u in range(users):
                pref = rng.normal(size=4)
                for i in rng.choice(listed, size=10, replace=False):
                    p = 1 / (1 + np.exp(-(taste[i] @ pref)))
                    click = int(rng.random() < p)
                    w.writerow([f"{market}-u{u}", catalogue[i], click, int(click and rng.random() < 0.3)])
    return folder


def main(small: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        write_demo_logs(logs, users=60 if small else 400)
        # The dataset contract every registered dataset must pass (ID spaces, labels, splits, ...).
        fm.check_dataset(lambda: fm.load_markets(f"shoplogs:{logs}", seed=0))

        small_model = {"cf_dim": 8, "latent_dim": 4, "vq_hidden": 16, "n_global": 8, "n_local": 4,
                       "vq_epochs": 2, "ctr_dim": 8, "ctr_hidden": [16], "ctr_epochs": 1, "batch_size": 64}
        cfg = fm.config_from_dict({
            "data": f"shoplogs:{logs}",
            "methods": ["fedmm"],
            "rounds": 1 if small else 3,
            "secagg": "masking",                      # pairwise masks: the aggregator sees only sums
            "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5},
            **({"model": small_model} if small else {}),
        })
        results = fm.run_experiment(cfg, out_dir=Path(tmp) / "run")
    summary = {"markets": sorted(results["markets"]),
               "auc": {m: round(v["fedmm"]["auc"], 4) for m, v in results["markets"].items()},
               "epsilon": {m: round(v["epsilon"], 4) for m, v in results["privacy"].items()},
               "secagg": {k: results["secagg"][k] for k in ("backend", "secure", "aggregations")}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(small="--small" in sys.argv)
