"""PF-MSMTrec: personalized federated multi-scenario multi-task MMoE over a :class:`SecureSum`.

Each scenario (market) is a client holding an :class:`~fedmm_secure.models.mmoe.MMoE`. One stage,
``"mmoe"``, runs ``rounds`` federated rounds; each round reads raw interactions (a DP step when
privacy is on) and then, bottom-up:

1. **Parameter template** (:func:`parameter_plan`): every parameter is either *shared* (sent,
   as an update, into the secure sum) or *local* (never leaves the client). ID embeddings are
   always local (ID spaces are disjoint); with the template, each expert's scenario-specific
   Linear and each task's gate are local too; only the experts' shared Linears, the side-feature
   embeddings (same meaning in every scenario) and the task towers are shared.
2. **Federated normalization**: the experts' LayerNorms compute statistics per record (nothing
   to aggregate) and their affine parameters are local, so no normalization state is uploaded.
3. **Conflict coordination** (:func:`project_conflict`), client side: the aggregator only sees
   sums, so each client compares its update of every shared block with last round's *global*
   update of that block (which every client derives from the sum it received) and, when they
   conflict (negative inner product), removes the conflicting component before uploading
   (PCGrad against the global direction).
4. **Secure weighted FedAvg of updates**: each client uploads ``[w * clip(delta), w]`` with
   ``w = n_train / n_max``; the sum gives the average update without revealing any client's.
   Every client then advances the same global model by it.
5. **Personalized aggregation of experts** (:func:`mix`): each client sets its expert block to
   ``alpha * global + (1 - alpha) * local`` with ``alpha`` chosen on a grid by its own
   validation score (or fixed, when the grid has one value: then no data is read).
6. **Personalized aggregation of towers**: the same, per task tower, after the experts'
   alpha is fixed (bottom-up).

Alpha is chosen on the validation cost accumulated over rounds (``alpha_memory``), so one
noisy round does not flip it. Each round's local training starts from the global shared model,
as in FedAvg (``train_from="tracked"``, the default, and ``"global"``), so the federation stays
coherent (with greedy per-round alphas and training from the mix, clients drifted to alpha = 0
and the average of drifted models helped nobody) and uploads do not depend on the validation
split. The personalized mix is the model the client keeps (checkpoints) and serves. Its local
side: with ``"tracked"``, the client's previous personalized shared parameters plus its own
update of this round (post-processing of the same DP-trained update, no extra epsilon), so a
scenario that needs to move far from the global model can get there over rounds; with
``"global"``, the freshly trained parameters (one local epoch from the global model).
``train_from="personal"`` trains from the mix instead.

Methods (:data:`METHODS`): ``local``, ``fedavg`` (every non-ID parameter averaged, no
personalization), ``pf_msmtrec`` and one ablation per mechanism.
Model selection is the same for every method: each client keeps the model with the best
validation score (``select_by``: mean CTR/CTCVR AUC by default, or the ESMM loss) among
everything it held (after local training, after aggregation); alpha is chosen by the same score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.market import MarketData, MarketSplit
from ..errors import ConfigError, DataError
from ..models.calibration import calibrate_metrics
from ..models.mmoe import MMoE, ctcvr_logit, esmm_loss
from .fedmm import RoundHooks, _seeded, evaluate_ctr
from .training import TrainerFactory, TrainSettings, plain_trainers
from .transport import SecureSum

__all__ = ["STAGE", "PFSettings", "Mechanisms", "METHODS", "Block", "ParameterPlan", "parameter_plan",
           "project_conflict", "mix", "ScenarioClient", "make_client", "client_upload", "client_receive",
           "run_pf_method", "scenario_inputs"]

STAGE = "mmoe"


@dataclass(frozen=True)
class PFSettings:
    """Model and training settings shared by every method (``cfg.pf`` in a run config)."""

    dim: int = 8
    n_experts: int = 4
    expert_hidden: tuple[int, ...] = (32,)
    tower_hidden: int = 16
    epochs: int = 1                  # local epochs per federated round
    batch_size: int = 256
    lr: float = 0.01
    update_bound: float = 0.5        # per-coordinate clip of uploaded updates (sizes the masking ring)
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    select_by: str = "auc"           # local model selection score: "auc" (mean CTR/CTCVR AUC) or "loss"
    # Where each round's local training starts and what is mixed with the global model:
    # "tracked" (train from global; mix global with the previous personal parameters + own
    # update), "global" (train from global; mix with the trained parameters) or "personal"
    # (train from the mix). See the module docstring and bench/RESULTS_pf_msmtrec.md.
    train_from: str = "tracked"
    alpha_memory: float = 0.7        # decay of the per-alpha validation cost accumulated over rounds (0: off)
    alpha_by: str = "select"         # alpha's validation cost: "select" (same as select_by), "auc" or "loss"
    calibrate: bool = True           # Platt-scale the kept model's CTR and CTCVR logits on validation rows

    def __post_init__(self) -> None:
        if self.train_from not in ("personal", "global", "tracked"):
            raise ConfigError("pf.train_from", f"unknown start {self.train_from!r}", allowed="personal, global, tracked")
        if self.select_by not in ("auc", "loss"):
            raise ConfigError("pf.select_by", f"unknown criterion {self.select_by!r}", allowed="auc, loss")
        if not isinstance(self.calibrate, bool):
            raise ConfigError("pf.calibrate", f"must be true or false, got {self.calibrate!r}")
        if self.alpha_by not in ("select", "auc", "loss"):
            raise ConfigError("pf.alpha_by", f"unknown criterion {self.alpha_by!r}", allowed="select, auc, loss")
        for f in ("dim", "n_experts", "tower_hidden", "epochs", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"pf.{f}", f"must be a positive integer, got {v!r}")
        if (not isinstance(self.expert_hidden, tuple) or not self.expert_hidden
                or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.expert_hidden)):
            raise ConfigError("pf.expert_hidden", "must be a non-empty list of positive integers")
        if (isinstance(self.alpha_memory, bool) or not isinstance(self.alpha_memory, (int, float))
                or not 0 <= self.alpha_memory < 1):
            raise ConfigError("pf.alpha_memory", f"must be in [0, 1), got {self.alpha_memory!r}")
        for f in ("lr", "update_bound"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not np.isfinite(v):
                raise ConfigError(f"pf.{f}", f"must be a positive number, got {v!r}")
        if (not isinstance(self.alpha_grid, tuple) or not self.alpha_grid
                or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in self.alpha_grid)):
            raise ConfigError("pf.alpha_grid", "must be a non-empty list of numbers in [0, 1]")


@dataclass(frozen=True)
class Mechanisms:
    """Which PF-MSMTrec mechanism is on (ablations switch one off)."""

    federated: bool
    template: bool = False        # scenario-specific expert parameters (and local gates)
    local_norm: bool = False      # normalization affine parameters stay local
    conflict: bool = False        # client-side projection against the global direction
    personal: bool = False        # personalized aggregation of experts
    tower_personal: bool = False  # personalized aggregation of task towers


_PF = Mechanisms(federated=True, template=True, local_norm=True, conflict=True, personal=True, tower_personal=True)
METHODS: dict[str, Mechanisms] = {
    "local": Mechanisms(federated=False),
    "fedavg": Mechanisms(federated=True),
    "pf_msmtrec": _PF,
    "pf_no_template": Mechanisms(True, False, True, True, True, True),
    "pf_no_fednorm": Mechanisms(True, True, False, True, True, True),
    "pf_no_conflict": Mechanisms(True, True, True, False, True, True),
    "pf_no_personal": Mechanisms(True, True, True, True, False, True),
    "pf_no_tower_personal": Mechanisms(True, True, True, True, True, False),
}


# ----------------------------------------------------------------------------- parameter template
@dataclass(frozen=True)
class Block:
    name: str                 # "side", "expert0", ..., "gates", "tower_ctr", "tower_cvr"
    group: str                # "expert" (first personalized aggregation) or "tower" (second)
    names: tuple[str, ...]    # parameter names, in upload order


@dataclass(frozen=True)
class ParameterPlan:
    """Which parameters are shared (in upload order, by block) and which stay local."""

    blocks: tuple[Block, ...]
    local: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(n for b in self.blocks for n in b.names)

    @property
    def dim(self) -> int:
        return sum(self.sizes[n] for n in self.shared)

    def slices(self) -> dict[str, slice]:
        out, pos = {}, 0
        for b in self.blocks:
            k = sum(self.sizes[n] for n in b.names)
            out[b.name] = slice(pos, pos + k)
            pos += k
        return out

    def group_index(self, group: str) -> np.ndarray:
        sl = self.slices()
        parts = [np.arange(sl[b.name].start, sl[b.name].stop) for b in self.blocks if b.group == group]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def parameter_plan(model: MMoE, mech: Mechanisms) -> ParameterPlan:
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    if not mech.federated:
        return ParameterPlan((), tuple(sizes), sizes)
    blocks: dict[str, tuple[str, list[str]]] = {}
    local: list[str] = []

    def put(block: str, group: str, name: str) -> None:
        blocks.setdefault(block, (group, []))[1].append(name)

    for n in sizes:
        head = n.split(".")
        if head[0] in ("user_id", "item_id"):
            local.append(n)                       # disjoint ID spaces: never shared
        elif head[0] in ("user_side", "item_side"):
            put("side", "expert", n)
        elif head[0] == "experts":
            part = head[2]
            if part == "specific" or (part == "norm" and mech.local_norm):
                local.append(n)
            else:
                put(f"expert{head[1]}", "expert", n)
        elif head[0] == "gates":
            # The gate decides how this scenario mixes the experts: scenario-specific under the
            # template, shared in plain FedAvg.
            if mech.template:
                local.append(n)
            else:
                put("gates", "expert", n)
        elif head[0] == "towers":
            put(f"tower_{head[1]}", "tower", n)
        else:  # a parameter this plan does not know: refuse rather than guess where it goes
            raise ConfigError("model", f"parameter {n!r} has no place in the PF-MSMTrec template")
    return ParameterPlan(tuple(Block(b, g, tuple(ns)) for b, (g, ns) in blocks.items()), tuple(local), sizes)


# ----------------------------------------------------------------------------- pure rules
def project_conflict(update: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, bool]:
    """PCGrad against the global direction: if ``update . direction < 0``, remove the component
    of ``update`` along ``direction``. Returns (new update, whether it conflicted)."""
    update = np.asarray(update, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64)
    dot = float(update @ direction)
    norm2 = float(direction @ direction)
    if norm2 <= 0.0 or dot >= 0.0:
        return update.copy(), False
    return update - (dot / norm2) * direction, True


def mix(global_vec: np.ndarray, local_vec: np.ndarray, alpha: float) -> np.ndarray:
    """Personalized aggregation: ``alpha * global + (1 - alpha) * local``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("alpha", f"must be in [0, 1], got {alpha!r}")
    return alpha * np.asarray(global_vec, dtype=np.float64) + (1.0 - alpha) * np.asarray(local_vec, dtype=np.float64)


# ----------------------------------------------------------------------------- clients
def scenario_inputs(data: MarketData, split: MarketSplit) -> torch.Tensor:
    cols = [split.users, split.items]
    if data.user_features is not None:
        cols += list(data.user_features[split.users].T)
    if data.item_features is not None:
        cols += list(data.item_features[split.items].T)
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))


@dataclass
class ScenarioClient:
    """Everything one scenario holds; only :func:`client_upload`'s output ever leaves it."""

    data: MarketData
    generator: torch.Generator
    model: MMoE
    plan: ParameterPlan
    weight: float
    select_by: str = "auc"
    global_vec: np.ndarray | None = None     # the global shared model, advanced by every sum
    direction: np.ndarray | None = None      # last round's global update (for conflict coordination)
    best: tuple[float, dict] | None = None
    alpha_costs: dict = field(default_factory=dict)   # accumulated validation cost per grid value
    personal_vec: np.ndarray | None = None   # train_from="tracked": the personalized shared parameters
    history: dict = field(default_factory=lambda: {"valid_loss": [], "alpha_expert": [], "alpha_tower": [],
                                                   "conflicts": []})
    _tensors: dict = field(default_factory=dict)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self._tensors:
            s = getattr(self.data, name)
            self._tensors[name] = (scenario_inputs(self.data, s), torch.from_numpy(s.click),
                                   torch.from_numpy(s.conversion))
        return self._tensors[name]

    def shared_vector(self) -> np.ndarray:
        params = dict(self.model.named_parameters())
        if not self.plan.shared:
            return np.zeros(0)
        return np.concatenate([params[n].detach().double().numpy().ravel() for n in self.plan.shared])

    @torch.no_grad()
    def load_shared(self, vec: np.ndarray) -> None:
        params = dict(self.model.named_parameters())
        pos = 0
        for n in self.plan.shared:
            p = params[n]
            k = p.numel()
            p.copy_(torch.from_numpy(np.asarray(vec[pos:pos + k]).reshape(p.shape)).to(p.dtype))
            pos += k

    @torch.no_grad()
    def valid_loss(self, criterion: str | None = None) -> float:
        """Validation cost, lower is better: the ESMM loss, or minus the mean of CTR and
        CTCVR AUC (``select_by="auc"``: the metric the scenario is judged on; a calibrated but
        non-ranking model can have the lowest loss)."""
        x, c, v = self.split("valid")
        a, b = self.model.logits(x)
        if (criterion or self.select_by) == "loss":
            return float(esmm_loss(a, b, c, v).mean())
        pctr = torch.sigmoid(a)
        ctr = evaluate_ctr(c.numpy(), pctr.numpy())["auc"]
        ctcvr = evaluate_ctr((c * v).numpy(), (pctr * torch.sigmoid(b)).numpy())["auc"]
        scores = [s for s in (ctr, ctcvr) if not np.isnan(s)]  # NaN: a split with one class only
        return -float(np.mean(scores)) if scores else 0.0

    def consider_checkpoint(self) -> float:
        """Local model selection on the client's own validation split."""
        loss = self.valid_loss()
        self.history["valid_loss"].append(loss)
        if self.best is None or loss < self.best[0]:
            self.best = (loss, {k: t.detach().clone() for k, t in self.model.state_dict().items()})
        return loss


def make_client(data: MarketData, settings: PFSettings, mech: Mechanisms, *, weight: float,
                generator: torch.Generator) -> ScenarioClient:
    with _seeded(generator):
        model = MMoE(n_users=data.n_users, n_items=data.n_items, user_feature_cards=data.user_feature_cards,
                     item_feature_cards=data.item_feature_cards, dim=settings.dim, n_experts=settings.n_experts,
                     expert_hidden=settings.expert_hidden, tower_hidden=settings.tower_hidden,
                     template=mech.template)
    return ScenarioClient(data, generator, model, parameter_plan(model, mech), weight, settings.select_by)


def client_upload(client: ScenarioClient, mech: Mechanisms, *, start: np.ndarray, trained: bool,
                  bound: float) -> np.ndarray:
    """What this client hands to the secure sum: ``[w * clip(delta), w]`` over shared parameters
    only, with conflicting blocks projected against last round's global direction first. A
    client that did not train this round (over budget) contributes zeros with weight 0."""
    if not trained:
        return np.zeros(client.plan.dim + 1)
    delta = client.shared_vector() - start
    n_conflicts = 0
    if mech.conflict and client.direction is not None:
        for sl in client.plan.slices().values():
            delta[sl], hit = project_conflict(delta[sl], client.direction[sl])
            n_conflicts += hit
    client.history["conflicts"].append(n_conflicts)
    return np.concatenate([client.weight * np.clip(delta, -bound, bound), [client.weight]])


def _choose_alpha(client: ScenarioClient, base: np.ndarray, target: np.ndarray, idx: np.ndarray,
                  grid: Sequence[float], *, key: str = "", memory: float = 0.0,
                  criterion: str | None = None) -> tuple[float, np.ndarray]:
    """Pick alpha on ``grid`` for the coordinates ``idx`` (others stay as in ``base``) by the
    client's validation score (lower cost wins; ties keep the earlier grid value); a one-value
    grid is used as is and reads no data. With ``memory > 0`` the choice uses each grid value's
    validation cost accumulated over rounds (``acc = memory * acc + cost``, kept per ``key``), so
    one noisy round does not flip the choice."""
    if len(grid) == 1:
        cand = base.copy()
        cand[idx] = mix(target[idx], base[idx], float(grid[0]))
        return float(grid[0]), cand
    costs, cands = [], []
    for a in grid:
        cand = base.copy()
        cand[idx] = mix(target[idx], base[idx], float(a))
        client.load_shared(cand)
        costs.append(client.valid_loss(criterion))
        cands.append(cand)
    costs = np.asarray(costs)
    if memory > 0:
        prev = client.alpha_costs.get(key)
        costs = costs if prev is None or len(prev) != len(costs) else memory * prev + costs
        client.alpha_costs[key] = costs
    i = int(np.argmin(costs))
    return float(grid[i]), cands[i]


def client_receive(client: ScenarioClient, mech: Mechanisms, total: np.ndarray, grid: Sequence[float], *,
                   memory: float = 0.0, start: np.ndarray | None = None, criterion: str | None = None) -> None:
    """Advance the global model by the average update, then personalize bottom-up: experts
    first, then each task tower. With ``start`` (``train_from="tracked"``) the local side of
    the mix is the client's previous personalized parameters plus its own update of this round
    (post-processing of the same DP-trained update: no extra privacy cost)."""
    w = float(total[-1])
    if w > 0:
        client.direction = np.asarray(total[:-1], dtype=np.float64) / w
        client.global_vec = client.global_vec + client.direction
    local = client.shared_vector()
    if start is not None and client.personal_vec is not None:
        local = client.personal_vec + (local - start)
    plan = client.plan
    cur = local.copy()
    idx = plan.group_index("expert")
    if mech.personal:
        a_e, cur = _choose_alpha(client, cur, client.global_vec, idx, grid, key="expert", memory=memory,
                                criterion=criterion)
    else:
        a_e = 1.0
        cur[idx] = client.global_vec[idx]
    client.history["alpha_expert"].append(a_e)
    sl = plan.slices()
    alphas = {}
    for b in plan.blocks:
        if b.group != "tower":
            continue
        t_idx = np.arange(sl[b.name].start, sl[b.name].stop)
        if mech.tower_personal:
            alphas[b.name], cur = _choose_alpha(client, cur, client.global_vec, t_idx, grid, key=b.name,
                                                memory=memory, criterion=criterion)
        else:
            alphas[b.name] = 1.0
            cur[t_idx] = client.global_vec[t_idx]
    client.history["alpha_tower"].append(alphas)
    if start is not None:
        client.personal_vec = cur.copy()
    client.load_shared(cur)


# ----------------------------------------------------------------------------- one method
def _labels_and_logits(client: ScenarioClient, split: str) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Per-task labels (click; click x conversion) and the model's (CTR, CVR) logits on ``split``."""
    x, c, v = client.split(split)
    return {"ctr": c.numpy(), "ctcvr": (c * v).numpy()}, client.model.logits(x)


def _task_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 logits of pCTR and of pCTCVR = pCTR * pCVR (exact in log space)."""
    return {"ctr": a.double().numpy(), "ctcvr": ctcvr_logit(a, b).numpy()}


def _evaluate(client: ScenarioClient, split: str = "test", *, calibrate: bool = False) -> dict:
    """AUC and LogLoss per task. With ``calibrate``, the LogLoss is that of the served model:
    the kept model's logits Platt-scaled on the client's validation rows (a monotone map: AUC
    is the same either way); ``logloss_uncalibrated`` is the raw model's."""
    labels, (a, b) = _labels_and_logits(client, split)
    p = MMoE.probabilities(a, b)
    out = {task: evaluate_ctr(labels[task], p[task].numpy()) for task in ("ctr", "ctcvr")}
    if calibrate:
        logits = _task_logits(a, b)
        v_labels, v_ab = _labels_and_logits(client, "valid")
        v_logits = _task_logits(*v_ab)
        for task in ("ctr", "ctcvr"):
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
    train_settings = TrainSettings(settings.epochs, settings.batch_size, settings.lr)
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
        for c in clients.values():
            c.consider_checkpoint()
        if mech.federated:
            vectors = {m: client_upload(c, mech, start=starts[m], trained=m in allowed, bound=settings.update_bound)
                       for m, c in clients.items()}
            result = secure_sum.secure_sum(label="pf-mmoe", round_id=rnd, vectors=vectors, max_abs=bounds)
            for m, total in result.sums.items():
                client_receive(clients[m], mech, total, settings.alpha_grid, memory=settings.alpha_memory,
                               start=starts[m] if settings.train_from == "tracked" else None,
                               criterion=None if settings.alpha_by == "select" else settings.alpha_by)
                clients[m].consider_checkpoint()
        progress(f"round {rnd + 1}/{rounds}")
    out: dict = {"markets": {}, "clients": clients}
    for m, c in clients.items():
        c.model.load_state_dict(c.best[1])
        out["markets"][m] = _evaluate(c, calibrate=settings.calibrate)
    return out
