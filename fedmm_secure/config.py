"""Run configuration: dataclasses validated at the boundary.

Every invalid value raises :class:`ConfigError` naming the field (dotted path) and what is
allowed; the CLI turns it into a one-line message and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ModelConfig", "PrivacyConfig", "RunConfig", "load_config", "config_from_dict",
           "dataclass_from_overrides", "METHODS", "DEFAULT_EPSILON", "DEFAULT_MAX_GRAD_NORM"]

METHODS = ("local", "local_codes", "fedavg", "fedmm", "centralized")
# Accepted by --methods but not run by default: evaluation references (synthetic data only).
# "oracle": `local` given each item's true cluster as an attribute; "fedmm_oracle": `fedmm` with
# the true clusters as its level-1 codes (what perfect codes would be worth to FedMM).
REFERENCE_METHODS = ("oracle", "fedmm_oracle")
# Methods whose markets share parameters through the secure sum.
SHARING_METHODS = ("fedavg", "fedmm", "fedmm_oracle")
DESIGNS = ("joint", "staged")
KEY_WEIGHTS = ("size", "counts")
CODE_USES = ("field", "key")
SERVES = ("ensemble", "select")
MODEL_FAMILIES = ("fedmm", "pf-msmtrec")
# DP-SGD clipping norm when the config names none: it should sit near the per-record gradient
# norms of the family's loss. PF-MSMTrec's ESMM loss (two BCE terms) has median per-record
# norms of 0.6-3.3 by label at initialisation; with 1.0 every non-click and converting record
# was clipped 2-3x harder than a click, which biased CTCVR (sweep in bench/RESULTS_pf_msmtrec.md).
DEFAULT_MAX_GRAD_NORM = {"fedmm": 1.0, "pf-msmtrec": 2.0}
SECAGG_BACKENDS = ("masking", "ckks", "plain")
# "interaction": all rows derived from one interaction (its positive and the negatives sampled for
# it), the unit implicit-feedback data needs; "auto" resolves to it for implicit-feedback loaders
# and to "record" elsewhere (synthetic and AliExpress data have one row per impression).
UNITS = ("record", "interaction", "user")
IMPLICIT_FEEDBACK_SCHEMES = ("xmrec", "movielens")
ACCOUNTANTS = ("pld", "prv", "rdp")
ON_EXCEED = ("skip", "stop")
RANDOMNESS = ("secure", "reproducible")  # privacy.randomness: see privacy/randomness.py
EMBEDDING_NOISE = ("dense", "sparse")  # privacy.embedding_noise: see privacy/sparse_selection.py
# privacy.embedding_noise: sparse without a share or threshold: f = 0.2 of the noise precision
# selects rows (the gradient noise std grows by 1/sqrt(0.8) = 1.118x), a row needs a noisy count
# of 3 units (an untouched row is selected with probability Phi(-3 / sigma1), 0.4-6% at epsilon 8).
DEFAULT_SPARSE_SELECTION_SHARE = 0.2
DEFAULT_SPARSE_THRESHOLD = 3.0
_DATA_SPEC = re.compile(r"^[a-z][a-z0-9_\-]{0,63}(:.+)?$")
# A run is private unless asked not to be (--no-dp): with no epsilon, noise multiplier or budget
# named, each market's noise is calibrated to this target (a budget alone caps it).
DEFAULT_EPSILON = 8.0


def _positive(name: str, value: Any, *, integer: bool) -> None:
    kind = int if integer else (int, float)
    # NaN compares False with everything and inf is no setting: both are named, not passed on.
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite positive {'integer' if integer else 'number'}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Model sizes and local training schedule (the run config's ``model`` section).

    Epochs are local epochs per federated round; ``ctr_model`` names a model registered with
    :func:`~fedmm_secure.models.registry.register_ctr_model`. Invalid values raise ConfigError.
    """

    cf_dim: int = 16
    cf_epochs: int = 1           # local epochs per federated round
    cf_lr: float = 0.02
    latent_dim: int = 8
    vq_hidden: int = 32
    n_global: int = 32           # level-1 (global) codebook size
    n_local: int = 8             # level-2 (local) codebook size
    vq_epochs: int = 30          # local encoder/decoder epochs per round
    vq_lr: float = 3e-3
    beta: float = 0.25           # commitment weight
    codebook_decay: float = 0.0  # 0 = plain k-means update from statistics
    ctr_model: str = "deepfm"    # a name registered with register_ctr_model
    ctr_dim: int = 16
    ctr_hidden: tuple[int, ...] = (64, 32)
    ctr_epochs: int = 2          # local epochs per federated round
    ctr_lr: float = 3e-3
    batch_size: int = 256
    # A market needing more steps than this per epoch at ``batch_size`` samples 1/this of its
    # records per step instead: large markets get large batches (fast; less noise per averaged
    # gradient at the same epsilon), markets below 64 x batch_size records keep ``batch_size``.
    # 64 was chosen on development seeds against 256 and no cap (bench/RESULTS_throughput.md).
    # null: no cap.
    max_steps_per_epoch: int | None = 64
    share_ctr_mlp: bool = True       # FedMM: average the CTR interaction MLP across markets
    share_autoencoder: bool = True   # FedMM: average RQ-VAE encoder/decoder across markets
    shared_bound: float = 2.0    # clip bound of every shared parameter coordinate (sizes the ring)
    calibrate: bool = True       # serve (and report LogLoss of) CTR logits Platt-scaled on the market's validation rows
    # Keep the best CTR model seen (local or averaged, any round) by the market's validation rows;
    # false: serve the final model. Both read validation rows: under DP each is a noisy, accounted
    # release (fedmm_secure/privacy/validation.py).
    select_by_validation: bool = True
    # "joint": one DP-trained CTR model per market, codes and sharing are its post-processing
    # (federation/fedmm/joint.py); "staged": the CF -> RQ-VAE -> CTR stages, two DP stages.
    design: str = "joint"
    code_round: int = 0          # joint design: codes are made after this CTR round
    vq_rounds: int = 4           # joint design: federated RQ-VAE rounds when codes are made
    # How a shared product's row is averaged over the markets that list it: "counts", by each
    # market's number of training interactions with that product, released once per run under
    # DP (one accounted Gaussian release; federation/catalogue.py says why); "size", by each
    # market's training-set size (public, nothing released). Counts chosen on development seeds
    # (bench/RESULTS_fedmm_dp.md).
    key_weights: str = "counts"
    # How the CTR model reads an item's level-1 (global) code: "field", as one more item field
    # for every item, its table averaged across markets like the attribute tables (the codebook
    # is global, so a code row means the same in every market); "key", as the shared-key table's
    # row for products only this market lists (shared products read their key row only). Field
    # chosen on development seeds; with the true clusters as codes (the fedmm_oracle reference)
    # it gains about half of what `oracle` gains on held-out seeds, "key" nothing
    # (bench/RESULTS_fedmm_dp.md).
    code_use: str = "field"
    # What a federated market makes of each round's two CTR models (locally trained; right after
    # averaging), joint design: "ensemble", one candidate that averages their logits (nothing is
    # compared, so under DP nothing is released); "select", the better of the two on the
    # market's validation rows (under DP one noisy comparison in the last round). Ensemble
    # chosen on development seeds: above the noisy choice on every XMRec market at epsilon 8
    # (bench/RESULTS_fedmm_dp.md).
    serve: str = "ensemble"

    def __post_init__(self) -> None:
        for f in ("cf_dim", "cf_epochs", "latent_dim", "vq_hidden", "n_global", "n_local", "vq_epochs",
                  "ctr_dim", "ctr_epochs", "batch_size"):
            _positive(f"model.{f}", getattr(self, f), integer=True)
        for f in ("cf_lr", "vq_lr", "beta", "ctr_lr", "shared_bound"):
            _positive(f"model.{f}", getattr(self, f), integer=False)
        if self.design not in DESIGNS:
            raise ConfigError("model.design", f"unknown design {self.design!r}", allowed=", ".join(DESIGNS))
        if self.key_weights not in KEY_WEIGHTS:
            raise ConfigError("model.key_weights", f"unknown weighting {self.key_weights!r}",
                              allowed=", ".join(KEY_WEIGHTS))
        if self.code_use not in CODE_USES:
            raise ConfigError("model.code_use", f"unknown code use {self.code_use!r}", allowed=", ".join(CODE_USES))
        if self.serve not in SERVES:
            raise ConfigError("model.serve", f"unknown serving {self.serve!r}", allowed=", ".join(SERVES))
        for f in ("code_round", "vq_rounds"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "code_round" else 1):
                raise ConfigError(f"model.{f}", f"must be an integer >= {0 if f == 'code_round' else 1}, got {v!r}")
        if not isinstance(self.ctr_model, str) or not self.ctr_model:
            raise ConfigError("model.ctr_model", f"must be a registered CTR model name, got {self.ctr_model!r}")
        if self.max_steps_per_epoch is not None:
            _positive("model.max_steps_per_epoch", self.max_steps_per_epoch, integer=True)
        for f in ("calibrate", "select_by_validation"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"model.{f}", f"must be true or false, got {getattr(self, f)!r}")
        if not 0 <= self.codebook_decay < 1:
            raise ConfigError("model.codebook_decay", f"must be in [0, 1), got {self.codebook_decay!r}")
        if not self.ctr_hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.ctr_hidden):
            raise ConfigError("model.ctr_hidden", "must be a non-empty list of positive integers")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP settings (the run config's ``privacy`` section).

    Private by default (``enabled``): the noise is calibrated to ``epsilon`` (default
    ``DEFAULT_EPSILON``, capped by ``epsilon_budget``) unless ``noise_multiplier`` is given;
    ``unit`` ``"interaction"`` (a positive and its sampled negatives), ``"record"`` (one row) or
    ``"user"``, default ``"auto"``: interaction for implicit-feedback data, else record;
    ``epsilon_budget`` and ``on_exceed`` (``"skip"`` the
    round or ``"stop"`` the run) form the budget policy; ``randomness`` ``"secure"`` (default)
    or ``"reproducible"`` (NOT private). ``embedding_noise`` ``"dense"`` (default: every table
    row is noised every step) or ``"sparse"`` (DP-AdaFEST: only rows selected by a noisy count
    of the units that looked them up are noised and updated; ``sparse_selection_share`` f in
    (0, 1) is the share of the noise precision spent on selection, ``sparse_threshold`` the
    noisy count a row needs, in units of the contribution clip C1 = 1, i.e. a number of units
    that each touch one row). Invalid values raise ConfigError.
    """

    enabled: bool = True
    unit: str = "auto"                     # see UNITS; resolved per data source by RunConfig.resolved
    delta: float = 1e-5
    epsilon: float | None = None           # calibrate the noise multiplier for the planned rounds
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None     # None: the model family's default (DEFAULT_MAX_GRAD_NORM)
    epsilon_budget: float | None = None
    on_exceed: str = "skip"
    accountant: str = "pld"
    market_noise_multiplier: float | None = None  # distributed DP on every upload (market level)
    # Where DP-SGD noise and batch sampling come from. "secure": an AES-256-CTR stream keyed from
    # the OS, unknown to anyone (default). "reproducible": torch generators seeded from `seed`, so
    # anyone who knows the seed can remove the noise: every output of such a run says NOT PRIVATE.
    randomness: str = "secure"
    embedding_noise: str = "dense"
    sparse_selection_share: float | None = None   # None: DEFAULT_SPARSE_SELECTION_SHARE
    sparse_threshold: float | None = None         # None: DEFAULT_SPARSE_THRESHOLD

    def __post_init__(self) -> None:
        if self.embedding_noise not in EMBEDDING_NOISE:
            raise ConfigError("privacy.embedding_noise", f"unknown mode {self.embedding_noise!r}",
                              allowed=", ".join(EMBEDDING_NOISE))
        if self.sparse_selection_share is not None:
            v = self.sparse_selection_share
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError("privacy.sparse_selection_share", f"must be a number in (0, 1), got {v!r}")
        if self.sparse_threshold is not None:
            _positive("privacy.sparse_threshold", self.sparse_threshold, integer=False)
        sparse_set = [f for f in ("sparse_selection_share", "sparse_threshold") if getattr(self, f) is not None]
        if sparse_set and self.embedding_noise != "sparse":
            raise ConfigError(f"privacy.{sparse_set[0]}", "only applies to privacy.embedding_noise: sparse",
                              allowed="embedding_noise: sparse, or drop it")
        if self.embedding_noise == "sparse" and not self.enabled:
            raise ConfigError("privacy.embedding_noise", "sparse set on a non-private run (--no-dp / enabled: false)",
                              allowed="drop it, or train with DP")
        if self.unit not in UNITS and self.unit != "auto":
            raise ConfigError("privacy.unit", f"unknown unit {self.unit!r}", allowed=", ".join(("auto", *UNITS)))
        if self.randomness not in RANDOMNESS:
            raise ConfigError("privacy.randomness", f"unknown source {self.randomness!r}",
                              allowed=", ".join(RANDOMNESS))
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError("privacy.accountant", f"unknown accountant {self.accountant!r}",
                              allowed=", ".join(ACCOUNTANTS))
        if self.on_exceed not in ON_EXCEED:
            raise ConfigError("privacy.on_exceed", f"unknown policy {self.on_exceed!r}", allowed=", ".join(ON_EXCEED))
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta!r}")
        for f in ("epsilon", "noise_multiplier", "epsilon_budget", "market_noise_multiplier"):
            v = getattr(self, f)
            if v is not None:
                _positive(f"privacy.{f}", v, integer=False)
        if self.max_grad_norm is not None:
            _positive("privacy.max_grad_norm", self.max_grad_norm, integer=False)
        if not isinstance(self.enabled, bool):
            raise ConfigError("privacy.enabled", f"must be true or false, got {self.enabled!r}")
        if not self.enabled:
            # A setting that only means something with DP must not be dropped silently.
            given = [f for f in ("epsilon", "noise_multiplier", "epsilon_budget", "market_noise_multiplier")
                     if getattr(self, f) is not None]
            if given:
                raise ConfigError(f"privacy.{given[0]}", "set on a non-private run (--no-dp / enabled: false)",
                                  allowed="drop it, or train with DP")
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError("privacy.noise_multiplier", "given together with a target epsilon",
                              allowed="one of --epsilon (calibrates the noise) or --noise-multiplier")
        target = self.target_epsilon
        if target is not None and self.epsilon_budget is not None and target > self.epsilon_budget:
            raise ConfigError("privacy.epsilon", f"target {target:g} is above the budget {self.epsilon_budget:g}: "
                              "every round past the budget would be refused",
                              allowed=f"a target <= {self.epsilon_budget:g}")

    @property
    def sparse_settings(self) -> tuple[float, float] | None:
        """``(selection share, threshold)`` with defaults filled in; None for dense noise."""
        if self.embedding_noise != "sparse":
            return None
        share = DEFAULT_SPARSE_SELECTION_SHARE if self.sparse_selection_share is None else self.sparse_selection_share
        tau = DEFAULT_SPARSE_THRESHOLD if self.sparse_threshold is None else self.sparse_threshold
        return float(share), float(tau)

    @property
    def target_epsilon(self) -> float | None:
        """The epsilon each market's noise is calibrated to: the configured one; with neither it
        nor a noise multiplier, ``DEFAULT_EPSILON`` capped by the budget; None without DP or
        when a noise multiplier is given."""
        if not self.enabled or self.noise_multiplier is not None:
            return None
        if self.epsilon is not None:
            return float(self.epsilon)
        return min(DEFAULT_EPSILON, self.epsilon_budget) if self.epsilon_budget is not None else DEFAULT_EPSILON


@dataclass(frozen=True)
class RunConfig:
    """One run: data (``"synthetic"`` or a registered ``name[:PATH]``), methods, rounds, the
    secure-aggregation backend (``"plain"`` only by name), the model family, and the ``model``
    and ``privacy`` sections. Build it directly, or with :func:`load_config` /
    :func:`config_from_dict`; invalid values raise ConfigError naming the field.
    """

    seed: int = 0
    rounds: int = 4
    methods: tuple[str, ...] = METHODS
    data: str = "synthetic"                 # "synthetic" or "<loader>:<path>"
    markets: tuple[str, ...] | None = None  # subset of markets to use
    synthetic: dict = field(default_factory=dict)  # overrides of SyntheticConfig fields
    secagg: str = "masking"                 # "plain" must be asked for by name
    model_family: str = "fedmm"             # "fedmm" or "pf-msmtrec"
    pf: dict = field(default_factory=dict)  # PF-MSMTrec settings (see fedmm_secure/workflows/pf_run.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {self.seed!r}")
        _positive("rounds", self.rounds, integer=True)
        if not self.methods:
            raise ConfigError("methods", "at least one method is required", allowed=", ".join(METHODS))
        for m in self.methods if self.model_family == "fedmm" else ():
            if m not in METHODS + REFERENCE_METHODS:
                raise ConfigError("methods", f"unknown method {m!r}", allowed=", ".join(METHODS + REFERENCE_METHODS))
            if m in REFERENCE_METHODS and self.data != "synthetic":
                # Refused before anything runs: references need the generator's true clusters.
                raise ConfigError("methods", f"{m} is a reference that needs the synthetic generator's true clusters",
                                  allowed=", ".join(METHODS))
        if self.secagg not in SECAGG_BACKENDS:
            raise ConfigError("secagg", f"unknown backend {self.secagg!r}", allowed=", ".join(SECAGG_BACKENDS))
        if self.model_family not in MODEL_FAMILIES:
            raise ConfigError("model_family", f"unknown model {self.model_family!r}", allowed=", ".join(MODEL_FAMILIES))
        # The name itself is checked against the dataset registry when the data is loaded (the
        # registry lives above this module); here only the shape ``name`` or ``name:PATH``.
        if not isinstance(self.data, str) or not _DATA_SPEC.match(self.data):
            raise ConfigError("data", f"unknown data source {self.data!r}",
                              allowed="synthetic, xmrec:PATH, movielens:PATH, aliexpress:PATH, or a registered NAME[:PATH]")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what config.json and the ledger's config hash record)."""
        return dataclasses.asdict(self)

    def max_grad_norm(self) -> float:
        """The DP-SGD clipping norm this run uses: the configured one or the family default."""
        c = self.privacy.max_grad_norm
        return float(DEFAULT_MAX_GRAD_NORM[self.model_family] if c is None else c)

    def resolved(self) -> RunConfig:
        """This config with defaults that depend on other fields written out, so what a run
        directory records (config.json, ledger) is explicit and survives a change of default."""
        p = self.privacy
        unit = self.privacy_unit()
        if not p.enabled or (p.max_grad_norm == self.max_grad_norm() and p.epsilon == p.target_epsilon
                             and unit == p.unit):
            return self
        return dataclasses.replace(self, privacy=dataclasses.replace(
            p, max_grad_norm=self.max_grad_norm(), epsilon=p.target_epsilon, unit=unit))

    def privacy_unit(self) -> str:
        """The unit this run protects: the configured one, or the data's default for "auto"
        (configs that were never resolved, e.g. built in code for a Flower worker)."""
        return self.default_unit() if self.privacy.unit == "auto" else self.privacy.unit

    def default_unit(self) -> str:
        """The protected unit when the config names none: for implicit-feedback data one
        interaction is several rows (a positive and its sampled negatives), so the unit is the
        interaction; elsewhere one row is one impression."""
        return "interaction" if self.data.split(":", 1)[0] in IMPLICIT_FEEDBACK_SCHEMES else "record"


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "config", f"must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(path, "unknown setting", allowed=", ".join(sorted(known)))
        if cls is RunConfig and key == "model":
            value = _build(ModelConfig, value, "model")
        elif cls is RunConfig and key == "privacy":
            value = _build(PrivacyConfig, value, "privacy")
        elif key in ("methods", "markets", "ctr_hidden") and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong types that dataclass construction itself rejects
        raise ConfigError(prefix or "config", str(e)) from None


def dataclass_from_overrides(cls, overrides: dict, *, prefix: str, nested: dict[str, type] | None = None):
    """Build ``cls`` from a mapping of field overrides; a list under a key of ``nested`` becomes a
    tuple of that dataclass. Unknown keys and wrong types raise ConfigError naming the field."""
    if not isinstance(overrides, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(overrides).__name__}")
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in overrides.items():
        if k not in known:
            raise ConfigError(f"{prefix}.{k}", "unknown setting", allowed=", ".join(sorted(known)))
        if nested and k in nested:
            item = nested[k]
            try:
                v = tuple(item(**x) for x in v)
            except TypeError as e:
                names = ", ".join(f.name for f in fields(item))
                raise ConfigError(f"{prefix}.{k}", str(e), allowed=f"list of {{{names}}}") from None
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(prefix, str(e)) from None


def config_from_dict(raw: dict) -> RunConfig:
    """Build a :class:`RunConfig` from a mapping (the parsed YAML/JSON); unknown keys and wrong
    values raise ConfigError naming the dotted field."""
    return _build(RunConfig, raw, "")


def load_config(path: str | Path) -> RunConfig:
    """Read a run config from a ``.yaml``/``.yml`` or JSON file; ConfigError if unreadable or
    invalid."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("--config", f"cannot read {p}: {e.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as e:  # parse errors of either format
        detail = " ".join(str(e).split())  # parsers' messages span lines; keep the error on one
        raise ConfigError("--config", f"{p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {detail}") from None
    return config_from_dict(raw)
