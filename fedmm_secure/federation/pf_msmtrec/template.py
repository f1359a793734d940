"""The parameter template (what is shared, by block, and what stays local) and the pure rules
applied to shared vectors: conflict projection and personalized mixing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfigError
from ...models.mmoe import MMoE
from .settings import Mechanisms

__all__ = ["Block", "ParameterPlan", "parameter_plan", "project_conflict", "mix"]


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
