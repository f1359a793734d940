"""Models: CF embeddings, the two-level RQ-VAE, CTR models."""

from .cf import CFModel
from .codebook import (CodeStats, assign_codes, code_statistics, perplexity, update_codebook,
                       utilization)
from .ctr import DeepFM
from .ensemble import LogitMean
from .registry import available_ctr_models, create_ctr_model, register_ctr_model
from .rqvae import RQVAE

__all__ = ["CFModel", "CodeStats", "assign_codes", "code_statistics", "perplexity",
           "update_codebook", "utilization", "DeepFM", "LogitMean", "RQVAE", "available_ctr_models", "create_ctr_model",
           "register_ctr_model"]
