"""FedMM and its baselines, as federated stages over a :class:`~..transport.SecureSum`.

Three stages run one after another, each for ``rounds`` federated rounds:

1. **CF embeddings** (reads raw clicks: a DP step when privacy is on). In FedMM the side-feature
   embedding tables, whose meaning is shared by all markets, are averaged through the secure
   sum after every round; ID embeddings never leave the market.
2. **RQ-VAE** on the market's item embeddings (post-processing of stage 1: costs no epsilon).
   The level-1 codebook is global: every market sends its per-code counts and vector sums, the
   aggregator sums them, and every market applies the same statistics-based update to its copy.
   The level-2 codebook is updated from local statistics only.
3. **CTR model** (reads raw clicks: a DP step when privacy is on) over user id, item id and the
   item's level-1 and level-2 codes. In FedMM the level-1 code embeddings are averaged through
   the secure sum after every round: level-1 codes live in one space, so their embeddings can be
   shared across markets while ID spaces stay disjoint.

Methods: ``local`` (stage 3 on IDs only), ``local_codes`` (all stages, nothing federated),
``fedmm``, ``centralized`` (all markets pooled into one market, then each market fine-tunes the
pooled model on its own rows and selects on its own validation split, :mod:`.finetune`: no
privacy, an upper bound).

Read top-down: :mod:`.protocol` (what a market's pipeline asks for), :mod:`.features` (a
market's state and model inputs), :mod:`.stages` (the three stages, per market),
:mod:`.pipeline` (one market's method, written once for every runtime), :mod:`.driver` (every
market in this process: :func:`run_method`), :mod:`.finetune` (the ``centralized`` per-market
step), :mod:`.evaluation` (test metrics) and
:mod:`.privacy` (the DP session a private run hands to the stages). The Flower runtime drives
each market's pipeline in its own market's worker instead of :mod:`.driver`.
"""

from __future__ import annotations

from .driver import drive_in_process, pool_markets, run_method, run_pipelines
from .features import MarketRun
from .pipeline import market_pipeline
from .protocol import Barrier, BroadcastRequest, Pipeline, PublicMeta, SumRequest

__all__ = ["run_method", "run_pipelines", "drive_in_process", "pool_markets", "market_pipeline", "MarketRun",
           "Pipeline", "PublicMeta", "SumRequest", "BroadcastRequest", "Barrier"]
