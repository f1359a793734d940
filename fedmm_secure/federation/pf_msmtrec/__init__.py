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
Under DP the validation rows are read only through accounted Gaussian releases: alpha by noisy
Brier scores (one release per grid value), the served Platt maps by noisy Newton steps, and the
final round's two checkpoints are compared by one noisy Brier-score difference.
"""

from __future__ import annotations

from .client import ScenarioClient, client_receive, client_upload, make_client, scenario_inputs
from .driver import evaluate_client, run_pf_method, validation_releases
from .settings import METHODS, STAGE, Mechanisms, PFSettings
from .template import Block, ParameterPlan, mix, parameter_plan, project_conflict

__all__ = ["STAGE", "PFSettings", "Mechanisms", "METHODS", "Block", "ParameterPlan", "parameter_plan",
           "project_conflict", "mix", "ScenarioClient", "make_client", "client_upload", "client_receive",
           "run_pf_method", "scenario_inputs", "evaluate_client", "validation_releases"]
