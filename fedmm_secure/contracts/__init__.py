"""Contract suites every registered implementation must pass, callable from any test runner.

Each module holds named checks (plain functions that raise :class:`ContractViolation`) and a
``check_*`` function running them all:

* :func:`check_dataset` (:mod:`.datasets`): what a dataset loader returns;
* :func:`check_ctr_model` (:mod:`.ctr_models`): what a CTR model factory builds;
* :func:`check_backend` (:mod:`.backends`): what a secure-aggregation backend computes and refuses.

The project's own test suite parametrizes these checks over every registered name, so a newly
registered implementation is tested without writing a test; a user can call ``check_*`` on
their implementation before registering it (see the examples).
"""

from .backends import BACKEND_CHECKS, check_backend
from .base import ContractViolation
from .ctr_models import CTR_MODEL_CHECKS, check_ctr_model
from .datasets import DATASET_CHECKS, check_dataset

__all__ = ["ContractViolation", "DATASET_CHECKS", "CTR_MODEL_CHECKS", "BACKEND_CHECKS",
           "check_dataset", "check_ctr_model", "check_backend"]
