"""What a command runs end to end, as library calls: no argv, no environment, no printing.

* :mod:`.fedmm_run` -- a FedMM run (every method on the same markets, embedded runtime);
* :mod:`.pf_run` -- a PF-MSMTrec run (every method or ablation on the same scenarios);
* :mod:`.flower_local` -- a FedMM run on a loopback Flower deployment;
* :mod:`.audit_targets` and :mod:`.audit` -- a finished run's CTR models as membership-inference
  audit targets, and the audit written to disk (the glue between ``audit`` and ``federation``).
"""

__all__: list[str] = []
