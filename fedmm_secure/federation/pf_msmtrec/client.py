"""One scenario's client: its state, what it uploads and how it takes the sum back.

Only :func:`client_upload`'s output ever leaves a client; :func:`client_receive` advances the
global model by the summed update and personalizes bottom-up (experts, then each task tower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...data.market import MarketData, MarketSplit
from ...metrics import evaluate_ctr
from ...models.mmoe import MMoE, esmm_loss
from ...privacy.validation import noisy_difference, noisy_scores, unit_index
from ..hooks import RoundHooks
from ..training import seeded
from .settings import Mechanisms, PFSettings
from .template import ParameterPlan, mix, parameter_plan, project_conflict

__all__ = ["scenario_inputs", "ScenarioClient", "make_client", "client_upload", "client_receive", "ALPHA", "SELECT"]

ALPHA = "pf-alpha"    # ledger stage label of a private alpha choice (one release per grid value)
SELECT = "pf-select"  # ledger stage label of the private checkpoint comparison (one release)


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
    final_rows: np.ndarray | None = None     # under DP: the final round's first checkpoint's Brier rows
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

    def _private_checkpoint(self, hooks: RoundHooks, final_round: bool) -> float:
        state = {k: t.detach().clone() for k, t in self.model.state_dict().items()}
        if not final_round or self.final_rows is None:
            # Newest kept; the final round's first checkpoint is remembered (nothing released).
            self.final_rows = self.valid_brier_rows() if final_round else None
            self.best = (float("nan"), state)
            return float("nan")
        access = hooks.validation_access(self.data.name, SELECT, 1)
        if access.mode == "refused":   # the newer checkpoint, nothing read
            self.best = (float("nan"), state)
            return float("nan")
        index, n = unit_index(self.data.valid, access.unit)
        d = noisy_difference(self.valid_brier_rows(), self.final_rows, index, n, access)
        if d < 0:
            self.best = (d, state)
        return d

    @torch.no_grad()
    def valid_brier_rows(self) -> np.ndarray:
        """Per validation row, the mean of the CTR and CTCVR Brier scores, in [0, 1]: the
        bounded score of private choices (AUC and the ESMM loss are not decomposable or not
        bounded)."""
        x, c, v = self.split("valid")
        a, b = self.model.logits(x)
        pctr = torch.sigmoid(a).double()
        pctcvr = pctr * torch.sigmoid(b).double()
        return (0.5 * ((pctr - c.double()) ** 2 + (pctcvr - (c * v).double()) ** 2)).numpy()

    def consider_checkpoint(self, hooks: RoundHooks | None = None, *, final_round: bool = True) -> float:
        """Local model selection on the client's own validation split. Under DP (``hooks``
        account validation reads) only the final round's checkpoints compete, by one noisy
        Brier-score difference (one accounted release); earlier ones are kept newest-first
        without reading (a noisy score across rounds favours early, barely trained models:
        bench/RESULTS_fedmm_dp.md), and only the served model depends on the choice."""
        if hooks is not None and hooks.validation_accounted:
            return self._private_checkpoint(hooks, final_round)
        loss = self.valid_loss()
        self.history["valid_loss"].append(loss)
        if self.best is None or loss < self.best[0]:
            self.best = (loss, {k: t.detach().clone() for k, t in self.model.state_dict().items()})
        return loss


def make_client(data: MarketData, settings: PFSettings, mech: Mechanisms, *, weight: float,
                generator: torch.Generator) -> ScenarioClient:
    with seeded(generator):
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
                  criterion: str | None = None, hooks: RoundHooks | None = None) -> tuple[float, np.ndarray]:
    """Pick alpha on ``grid`` for the coordinates ``idx`` (others stay as in ``base``) by the
    client's validation score (lower cost wins; ties keep the earlier grid value); a one-value
    grid is used as is and reads no data. With ``memory > 0`` the choice uses each grid value's
    validation cost accumulated over rounds (``acc = memory * acc + cost``, kept per ``key``), so
    one noisy round does not flip the choice. Under DP (``hooks`` account validation reads) the
    costs are the grid values' Brier scores with Gaussian noise, one accounted release each; a
    refused release takes the first grid value without reading anything."""
    if len(grid) == 1:
        cand = base.copy()
        cand[idx] = mix(target[idx], base[idx], float(grid[0]))
        return float(grid[0]), cand
    private = hooks is not None and hooks.validation_accounted
    access = hooks.validation_access(client.data.name, ALPHA, len(grid)) if private else None
    costs, cands, rows = [], [], []
    for a in grid:
        cand = base.copy()
        cand[idx] = mix(target[idx], base[idx], float(a))
        cands.append(cand)
        if access is not None and access.mode == "refused":
            continue
        client.load_shared(cand)
        if private:
            rows.append(client.valid_brier_rows())
        else:
            costs.append(client.valid_loss(criterion))
    if access is not None and access.mode == "refused":
        return float(grid[0]), cands[0]
    if access is not None:
        index, n = unit_index(client.data.valid, access.unit)
        costs = noisy_scores(rows, index, n, access)
    costs = np.asarray(costs)
    if memory > 0:
        prev = client.alpha_costs.get(key)
        costs = costs if prev is None or len(prev) != len(costs) else memory * prev + costs
        client.alpha_costs[key] = costs
    i = int(np.argmin(costs))
    return float(grid[i]), cands[i]


def client_receive(client: ScenarioClient, mech: Mechanisms, total: np.ndarray, grid: Sequence[float], *,
                   memory: float = 0.0, start: np.ndarray | None = None, criterion: str | None = None,
                   hooks: RoundHooks | None = None) -> None:
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
                                criterion=criterion, hooks=hooks)
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
                                                memory=memory, criterion=criterion, hooks=hooks)
        else:
            alphas[b.name] = 1.0
            cur[t_idx] = client.global_vec[t_idx]
    client.history["alpha_tower"].append(alphas)
    if start is not None:
        client.personal_vec = cur.copy()
    client.load_shared(cur)
