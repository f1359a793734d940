"""One PF-MSMTrec method end to end over a secure sum, and the test metrics of what it serves."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...data.market import MarketData
from ...errors import ConfigError, DataError
from ...metrics import evaluate_ctr
from ...models.calibration import PlattScaling, calibrate_metrics, served_metrics
from ...models.mmoe import MMoE, ctcvr_logit, esmm_loss
from ..hooks import RoundHooks
from ..training import TrainerFactory, TrainSettings, plain_trainers
from ..transport import SecureSum
from ...privacy.validation import PLATT_STEPS, private_platt, unit_index
from .client import ScenarioClient, client_receive, client_upload, make_client
from .settings import METHODS, STAGE, PFSettings

__all__ = ["evaluate_client", "run_pf_method", "validation_releases"]


# ----------------------------------------------------------------------------- one method
def _labels_and_logits(client: ScenarioClient, split: str) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Per-task labels (click; click x conversion) and the model's (CTR, CVR) logits on ``split``."""
    x, c, v = client.split(split)
    return {"ctr": c.numpy(), "ctcvr": (c * v).numpy()}, client.model.logits(x)


def _task_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 logits of pCTR and of pCTCVR = pCTR * pCVR (exact in log space)."""
    return {"ctr": a.double().numpy(), "ctcvr": ctcvr_logit(a, b).numpy()}


def validation_releases(method: str, settings: PFSettings, rounds: int, client: ScenarioClient) -> int:
    """Gaussian releases from one scenario's validation rows in a private run of ``method``:
    every alpha choice releases one noisy score per grid value (experts, then each personalized
    tower, every round of a federated method), the final round's two checkpoints one comparison
    (federated methods), and each task's Platt fit ``PLATT_STEPS``. ``client``: any scenario's
    (for its blocks)."""
    mech, k = METHODS[method], len(settings.alpha_grid)
    choices = 0
    if mech.federated and k > 1:
        towers = sum(b.group == "tower" for b in client.plan.blocks)
        choices = (1 if mech.personal else 0) + (towers if mech.tower_personal else 0)
    return rounds * choices * k + (1 if mech.federated else 0) + (2 * PLATT_STEPS if settings.calibrate else 0)


def _private_platt(client: ScenarioClient, task: str, logits: np.ndarray, labels: np.ndarray,
                   hooks: RoundHooks) -> PlattScaling:
    access = hooks.validation_access(client.data.name, f"calibrate-{task}", PLATT_STEPS)
    if access.mode == "refused":
        return PlattScaling()
    index, n = unit_index(client.data.valid, access.unit)
    return private_platt(logits, labels, index, n, access, PLATT_STEPS)


def evaluate_client(client: ScenarioClient, split: str = "test", *, calibrate: bool = False,
                    hooks: RoundHooks | None = None) -> dict:
    """AUC and LogLoss per task. With ``calibrate``, the LogLoss is that of the served model:
    the kept model's logits Platt-scaled on the client's validation rows (a monotone map: AUC
    is the same either way); ``logloss_uncalibrated`` is the raw model's. When ``hooks``
    account validation reads (DP), each task's map is a private fit, its releases on the ledger."""
    labels, (a, b) = _labels_and_logits(client, split)
    p = MMoE.probabilities(a, b)
    out = {task: evaluate_ctr(labels[task], p[task].numpy()) for task in ("ctr", "ctcvr")}
    if calibrate:
        logits = _task_logits(a, b)
        v_labels, v_ab = _labels_and_logits(client, "valid")
        v_logits = _task_logits(*v_ab)
        for task in ("ctr", "ctcvr"):
            if hooks is not None and hooks.validation_accounted:
                platt = _private_platt(client, task, v_logits[task], v_labels[task], hooks)
                out[task] = served_metrics(out[task], platt, test_logits=logits[task], test_labels=labels[task])
            else:
                out[task] = calibrate_metrics(out[task], valid_logits=v_logits[task], valid_labels=v_labels[task],
                                              test_logits=logits[task], test_labels=labels[task])
    return out


def run_pf_method(method: str, markets: Sequence[MarketData], settings: PFSettings, *, rounds: int, seed: int,
                  secure_sum: SecureSum | None, trainers: TrainerFactory = plain_trainers,
                  hooks: RoundHooks | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Run one method; returns ``{"markets": {m: {"ctr": {...}, "ctcvr": {...}}}, "clients": ...}``."""
    if method not in METHODS:
        raise ConfigError("methods", f"unknown method {method!r}", allowed=", ".join(METHODS))
    mech = METHODS[method]
    if mech.federated and secure_sum is None:
        raise ConfigError("secagg", f"method {method!r} federates and needs a secure sum")
    if mech.federated and len({(tuple(m.user_feature_cards), tuple(m.item_feature_cards)) for m in markets}) > 1:
        raise DataError("federated scenarios must share side-feature cardinalities (shared meaning)")
    hooks = hooks or RoundHooks()
    n_max = max(len(m.train) for m in markets)
    clients = {m.name: make_client(m, settings, mech, weight=len(m.train) / n_max,
                                   generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
               for i, m in enumerate(markets)}
    if mech.federated:
        # Shared parameters start identical everywhere (a public seed), as in FedAvg.
        first = next(iter(clients.values()))
        init = first.shared_vector()
        for c in clients.values():
            c.load_shared(init)
            c.global_vec = init.copy()
        dim = first.plan.dim
        bounds = np.concatenate([np.full(dim, settings.update_bound), [1.0]])
    train_settings = TrainSettings(settings.epochs, settings.batch_size, settings.lr, settings.max_steps_per_epoch)
    for rnd in range(rounds):
        allowed = hooks.before_round(STAGE, rnd, list(clients))
        starts = {}
        for m, c in clients.items():
            if mech.federated and settings.train_from in ("global", "tracked") and c.global_vec is not None:
                c.load_shared(c.global_vec)
            starts[m] = c.shared_vector()
            if m not in allowed:
                continue
            x, click, conv = c.split("train")

            def loss(model, idx, x=x, click=click, conv=conv):
                a, b = model(x[idx])
                return esmm_loss(a, b, click[idx], conv[idx])

            trainers(market=m, stage=STAGE, model=c.model, loss_fn=loss, n_records=len(x),
                     users=torch.from_numpy(c.data.train.users), settings=train_settings,
                     generator=c.generator).train_epochs(settings.epochs)
        hooks.before_release(STAGE, rnd)
        final = rnd == rounds - 1
        for c in clients.values():
            c.consider_checkpoint(hooks, final_round=final)
        if mech.federated:
            vectors = {m: client_upload(c, mech, start=starts[m], trained=m in allowed, bound=settings.update_bound)
                       for m, c in clients.items()}
            result = secure_sum.secure_sum(label="pf-mmoe", round_id=rnd, vectors=vectors, max_abs=bounds)
            for m, total in result.sums.items():
                client_receive(clients[m], mech, total, settings.alpha_grid, memory=settings.alpha_memory,
                               start=starts[m] if settings.train_from == "tracked" else None,
                               criterion=None if settings.alpha_by == "select" else settings.alpha_by,
                               hooks=hooks)
                clients[m].consider_checkpoint(hooks, final_round=final)
        progress(f"round {rnd + 1}/{rounds}")
    out: dict = {"markets": {}, "clients": clients}
    for m, c in clients.items():
        c.model.load_state_dict(c.best[1])
        out["markets"][m] = evaluate_client(c, calibrate=settings.calibrate, hooks=hooks)
    return out
