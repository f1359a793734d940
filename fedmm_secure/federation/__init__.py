"""Federated methods, transport-agnostic: they talk to a runtime only through a ``SecureSum``.

:mod:`.fedmm` (FedMM and its baselines), :mod:`.pf_msmtrec` (PF-MSMTrec and its ablations),
:mod:`.hooks` (what the privacy layer says around every round), :mod:`.training` (local training
loops shaped for DP-SGD) and :mod:`.transport` (the secure-sum interface). Nothing here imports a
secure-aggregation backend or a runtime.
"""

__all__: list[str] = []
