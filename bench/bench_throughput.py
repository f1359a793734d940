"""Training throughput (rows/s) of the local loops, plain and DP, against a bare PyTorch anchor.

Run (repo root)::

    .venv/bin/python bench/bench_throughput.py [--size rich|mid] [--batches 256,4096] [--reps 5]

One market the size of the largest one of ``bench/configs/synthetic_10_markets.json`` at scale
10 (``rich``: 100,000 users, 30,000 items, 1.4M training rows) or a mid-size one (``mid``: 30,000
users, 12,000 items, 210,000 rows); random ids and labels (throughput does not depend on them).
Per stage and batch size, in one process, modes are timed in interleaved blocks of steps
(round-robin, ``--reps`` times) and the medians reported, with the ratio to the anchor taken
within each round:

* ``anchor``: bare PyTorch: the same DeepFM (user, item, two code fields; 16-dim embeddings,
  MLP 64-32), shuffled fixed-size batches, mean BCE, ``torch.optim.Adam`` with its defaults
  (``anchor_fused``: the same loop with ``Adam(fused=True)``, the strongest bare loop);
* ``plain``: :class:`~fedmm_secure.federation.training.PlainTrainer` (Poisson sampling, fused Adam);
* ``dp``: the DP-SGD trainer a private run builds (``PrivacySession``: per-record clipping,
  Gaussian noise on every parameter from the OS-keyed AES-CTR stream, Poisson sampling,
  fused Adam); ``dp_prefetch``: the same with the next step's noise drawn on a second thread;
  ``dp_before``: the DP loop as it was before the throughput work, rebuilt from today's parts
  (one random word per record per step for Poisson sampling, torch's default single-tensor
  Adam, a fresh noise buffer per parameter per step), for the before/after ratio.

Stages: ``ctr`` (DeepFM with codes, as FedMM's stage 3) and ``cf`` (the CF model of stage 1).
Rows/s counts expected rows per step (the batch size), per wall second and per CPU second of the
process (all its threads; on a shared machine the CPU figure is the steadier one, the wall figure
depends on the share the scheduler gives). ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedmm_secure.federation.training import PlainTrainer, TrainSettings
from fedmm_secure.models.cf import CFModel
from fedmm_secure.models.ctr import DeepFM
from fedmm_secure.privacy.dpsgd import dp_train_epoch
from fedmm_secure.privacy.session import PrivacySession, plan_markets

__all__ = ["SIZES", "measure", "main"]

SIZES = {"rich": (100_000, 30_000, 1_400_000), "mid": (30_000, 12_000, 210_000)}
N_GLOBAL, N_LOCAL, DIM = 32, 8, 16


class _Data:
    def __init__(self, users: int, items: int, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.users, self.items = users, items
        self.u = torch.randint(0, users, (n,), generator=g)
        self.i = torch.randint(0, items, (n,), generator=g)
        codes = torch.randint(0, N_GLOBAL, (items,), generator=g), torch.randint(0, N_LOCAL, (items,), generator=g)
        self.x = torch.stack([self.u, self.i, codes[0][self.i], codes[1][self.i]], 1)
        self.y = (torch.rand(n, generator=g) < 0.2).float()
        self.n = n
        self.feats = torch.stack([torch.randint(0, 8, (items,), generator=g), torch.randint(0, 4, (items,), generator=g)], 1)


def _model(stage: str, d: _Data) -> torch.nn.Module:
    torch.manual_seed(0)
    if stage == "ctr":
        return DeepFM(fields=[("user", d.users), ("item", d.items), ("code1", N_GLOBAL), ("code2", N_LOCAL)], dim=DIM)
    return CFModel(n_users=d.users, n_items=d.items, dim=DIM, item_feature_cards=(8, 4), item_features=d.feats)


def _loss(stage: str, d: _Data) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    if stage == "ctr":
        return lambda m, idx: F.binary_cross_entropy_with_logits(m(d.x[idx]), d.y[idx], reduction="none")
    return lambda m, idx: F.binary_cross_entropy_with_logits(m(d.u[idx], d.i[idx]), d.y[idx], reduction="none")


def _anchor(stage: str, d: _Data, batch: int, fused: bool = False) -> Callable[[int], None]:
    model = _model(stage, d)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=fused or None)
    loss = _loss(stage, d)
    state = {"perm": torch.randperm(d.n), "at": 0}

    def run(steps: int) -> None:
        for _ in range(steps):
            if state["at"] + batch > d.n:
                state["perm"], state["at"] = torch.randperm(d.n), 0
            idx = state["perm"][state["at"]:state["at"] + batch]
            state["at"] += batch
            opt.zero_grad(set_to_none=True)
            loss(model, idx).mean().backward()
            opt.step()
    return run


def _plain(stage: str, d: _Data, batch: int) -> Callable[[int], None]:
    t = PlainTrainer(model=_model(stage, d), loss_fn=_loss(stage, d), n_records=d.n,
                     settings=TrainSettings(1, batch, 3e-3), generator=torch.Generator().manual_seed(1))
    return t.train_steps


def _dp(stage: str, d: _Data, batch: int, prefetch: bool = False) -> Callable[[int], None]:
    plans = plan_markets(unit="record", batch_size=batch, epochs={stage: 1}, rounds=1,
                         n_records={"m": d.n}, n_users={"m": d.users})
    session = PrivacySession(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure")
    local = session(market="m", stage=stage, model=_model(stage, d), loss_fn=_loss(stage, d), n_records=d.n,
                    users=d.u, settings=TrainSettings(1, batch, 3e-3), generator=torch.Generator().manual_seed(1))
    trainer = local.trainer
    if prefetch:
        from fedmm_secure.privacy.noise import NoisePrefetcher
        trainer._prefetch = NoisePrefetcher(trainer._params, trainer.generator, trainer._noise_std())
    return lambda steps: dp_train_epoch(trainer, lambda idx: idx, steps=steps)


def _dp_before(stage: str, d: _Data, batch: int) -> Callable[[int], None]:
    from fedmm_secure.privacy.randomness import bernoulli_indices
    from fedmm_secure.privacy.sampling import PoissonDraw

    plans = plan_markets(unit="record", batch_size=batch, epochs={stage: 1}, rounds=1,
                         n_records={"m": d.n}, n_users={"m": d.users})
    session = PrivacySession(unit="record", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure")
    model = _model(stage, d)
    local = session(market="m", stage=stage, model=model, loss_fn=_loss(stage, d), n_records=d.n,
                    users=d.u, settings=TrainSettings(1, batch, 3e-3), generator=torch.Generator().manual_seed(1))
    trainer = local.trainer
    old_opt = torch.optim.Adam(trainer._params, lr=3e-3, foreach=False)
    old_opt.register_step_pre_hook(trainer._refuse_unaccounted_step)
    trainer._optimizer = old_opt
    trainer._buffer = lambda p: torch.empty_like(p)  # a fresh allocation every step
    sampler = trainer.sampler

    def sample() -> PoissonDraw:
        idx = bernoulli_indices(sampler.generator, sampler.num_records, sampler.sample_rate)
        return PoissonDraw(idx, torch.arange(idx.numel()), int(idx.numel()), sampler.sample_rate, sampler.unit,
                           id(sampler))
    sampler.sample = sample
    return lambda steps: dp_train_epoch(trainer, lambda idx: idx, steps=steps)


def measure(stage: str, d: _Data, batch: int, *, reps: int, rows_per_block: int,
            modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    makers = {"anchor": _anchor, "anchor_fused": lambda s, dd, b: _anchor(s, dd, b, fused=True),
              "plain": _plain, "dp": _dp,
              "dp_prefetch": lambda s, dd, b: _dp(s, dd, b, prefetch=True), "dp_before": _dp_before}
    runs = {m: makers[m](stage, d, batch) for m in modes}
    steps = max(2, rows_per_block // batch)
    for run in runs.values():  # warm-up: allocations, optimizer state
        run(2)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ratios: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(reps):
        block, cpu_block = {}, {}
        for m, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(steps)
            block[m] = steps * batch / (time.perf_counter() - t0)
            cpu_block[m] = steps * batch / max(time.process_time() - c0, 1e-9)
            rates[m].append(block[m])
            cpu_rates[m].append(cpu_block[m])
        for m in modes:
            ratios[m].append(block[m] / block["anchor"])
            cpu_ratios[m].append(cpu_block[m] / cpu_block["anchor"])
    med = statistics.median
    return {m: {"rows_s": med(rates[m]), "x_anchor": med(ratios[m]), "rows_cpu_s": med(cpu_rates[m]),
                "x_anchor_cpu": med(cpu_ratios[m])} for m in modes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="rich")
    ap.add_argument("--batches", default="256,4096")
    ap.add_argument("--stages", default="ctr,cf")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows-per-block", type=int, default=32_768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefetch", action="store_true", help="also time dp_prefetch")
    ap.add_argument("--before", action="store_true", help="also time dp_before")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = _Data(*SIZES[args.size])
    print(f"size {args.size}: {d.users} users, {d.items} items, {d.n} rows; torch threads {args.threads}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print("| stage | batch | mode | rows/s (wall) | x anchor | rows/CPU-s | x anchor (CPU) |\n|---|---|---|---|---|---|---|")
    for stage in args.stages.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            modes = (("anchor", "anchor_fused", "plain", "dp") + (("dp_prefetch",) if args.prefetch else ())
                     + (("dp_before",) if args.before else ()))
            res = measure(stage, d, batch, reps=args.reps, rows_per_block=args.rows_per_block, modes=modes)
            for m, r in res.items():
                print(f"| {stage} | {batch} | {m} | {r['rows_s']:,.0f} | {r['x_anchor']:.2f} | "
                      f"{r['rows_cpu_s']:,.0f} | {r['x_anchor_cpu']:.2f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
