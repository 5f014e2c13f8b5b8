"""Structured configs: the schema of every config group, registered in Hydra's ConfigStore.

Each YAML file under ``configs/<group>/`` starts from one of these dataclasses (its
``defaults`` list names ``base_<option>``), so a misspelt key or a value of the wrong type
fails at composition time with the key's full name. Ranges that a type cannot express
(lr > 0, 0 <= p < 1, finite numbers, ...) and keys force-added with ``+key=`` are checked by
:func:`validate`, which raises :class:`regexp.errors.ConfigError` naming the key and what would
be valid. :func:`check_overrides` checks the command line before Hydra composes it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from regexp.errors import ConfigError


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    # Where datasets are cached (MNIST-1D) or looked for / downloaded to (torchvision).
    root: str = "${oc.env:REGEXP_DATA_DIR,'~/.cache/regexp'}"
    n_train: Optional[int] = None  # subset of the training set (after the validation split)
    val_fraction: float = 0.1  # carved from the training set; the test set is never used to choose
    label_noise: float = 0.0  # fraction of training labels replaced by a different class
    n_test: Optional[int] = None  # MNIST-1D only: generate a larger test set for less noisy curves
    download: bool = True  # torchvision datasets only
    split_seed: Optional[int] = None  # seed of split/subset/noise; None: the run's seed
    # k-fold cross-validation: with folds=k >= 2, fold ``fold`` of the training set is the
    # validation set (val_fraction is then ignored) and the other k-1 folds are trained on.
    folds: int = 0
    fold: int = 0
    # Zhang et al. (2017): none|gaussian|random_pixels|shuffled_pixels (regexp/data/random_inputs.py)
    random_inputs: str = "none"


# ---------------------------------------------------------------- models
@dataclass
class MLPConfig:
    name: str = "mlp"
    width: int = 100
    depth: int = 2  # hidden layers; 0: one linear layer, i.e. (multinomial) logistic regression
    activation: str = "relu"
    init: str = "default"
    init_std: float = 0.01  # used by init=normal
    init_a: Optional[float] = None  # used by init=uniform: U(-a, a); null: a = 1/sqrt(fan_in)
    norm: str = "none"
    bias: bool = True
    # The hidden widths one by one (e.g. [40, 20, 20]); null: depth layers of width. Overrides both.
    widths: Optional[List[int]] = None
    residual: bool = False  # h + σ(W h + b) around each hidden layer that keeps the width


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: List[int] = field(default_factory=lambda: [16, 32])
    # kernel_size, stride, padding: an integer for every stage, or a list with one per stage.
    kernel_size: Any = 5
    stride: Any = 1
    padding: Any = None  # None: kernel_size // 2 (the length is kept when stride is 1)
    pool: str = "max"
    head: str = "gap"  # gap: global average pooling, then Linear; flatten: flatten, then Linear
    norm: str = "none"
    activation: str = "relu"
    init: str = "default"
    init_std: float = 0.01
    init_a: Optional[float] = None  # used by init=uniform: U(-a, a); null: a = 1/sqrt(fan_in)


@dataclass
class GRUConfig:
    name: str = "gru"
    hidden_size: int = 6
    layers: int = 1
    bidirectional: bool = True
    head: str = "flatten"  # flatten: every step's output into Linear; last: the final states only
    init: str = "default"  # PyTorch's GRU initialization (the other schemes are for Linear/Conv)


@dataclass
class TransformerConfig:
    name: str = "transformer"
    embed_dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: Optional[int] = None  # None: 1 for 1-D signals (40 tokens), 4 for images
    init: str = "default"
    init_std: float = 0.02
    init_a: Optional[float] = None  # used by init=uniform: U(-a, a); null: a = 1/sqrt(fan_in)


# ---------------------------------------------------------------- optimizers
@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0


@dataclass
class AdagradConfig:
    name: str = "adagrad"
    lr: float = 0.05
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    lr: float = 1e-3
    alpha: float = 0.99  # the decay rho of the squared-gradient average
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False


@dataclass
class AdadeltaConfig:
    name: str = "adadelta"
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    weight_decay: float = 0.0  # decoupled (AdamW) decay; only adamw sets it


@dataclass
class SAMConfig:
    """SAM / ASAM (regexp/optim/sam.py) around a base optimizer; the base's own keys (momentum
    for sgd/momentum/nesterov, betas and eps for adam/adamw) keep their meaning."""
    name: str = "sam"
    base: str = "sgd"  # sgd|momentum|nesterov|adam|adamw
    lr: float = 0.05
    rho: float = 0.05  # radius of the ascent step (Foret et al. 2021 use 0.05 with SGD)
    adaptive: bool = False  # ASAM (Kwon et al. 2021): the ball scaled by |w| + eta
    eta: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    weight_decay: float = 0.0  # decoupled decay of base=adamw


# ---------------------------------------------------------------- schedulers
@dataclass
class SchedulerConfig:
    name: str = MISSING
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr, for any schedule
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the base lr
    step_size: int = 1000  # step: multiply by gamma every step_size steps
    gamma: float = 0.1
    period: int = 500  # cosine_restarts: length of the first cycle in steps
    period_mult: float = 1.0  # cosine_restarts: each cycle is this much longer


# ---------------------------------------------------------------- trainer, logger
@dataclass
class TrainerConfig:
    epochs: int = 20
    batch_size: Any = 100  # an int, or "full" for full-batch gradient descent
    device: str = "auto"
    eval_every: int = 1
    grad_clip: Optional[float] = None  # max global gradient norm
    deterministic: bool = False
    # torch intra-op threads on CPU: an integer, or auto (one thread for a step too small to
    # gain from more, never more than the idle cores; see regexp/train/threads.py)
    threads: Any = "auto"
    progress: bool = True
    checkpoint_every: int = 0  # epochs; 0: only at the end
    resume: bool = False
    overwrite: bool = False
    eval_batch_size: int = 4096


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    histogram_every: int = 5  # epochs; 0 disables weight histograms
    grad_norms: bool = True


@dataclass
class SweepConfig:
    # Dotted key -> list of values; the sweep runs their product, once per seed.
    params: Dict[str, Any] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0])
    x: Optional[str] = None  # the key on the x axis of results.csv's plot; default: first of params
    engine: str = "auto"  # auto|serial|population: how the points are trained
    # Spread the grid over jobs: `-m sweep.shard=0,1,2,3 sweep.shards=4` (any launcher) trains
    # point i in job i % shards; the points and the report meet in <hydra.sweep.dir>/points/.
    shard: int = 0
    shards: int = 1


# ---------------------------------------------------------------- probes
@dataclass
class ProbeConfig:
    """``probe=[hessian,sharpness]``: measurements of the model during and after training
    (regexp/probes/); each chosen probe fills its field with its own schema."""
    every: int = 0  # epochs between measurements; 0: only at the end of the run
    batch_size: int = 256  # the fixed probe batch, drawn from the training set by the seed
    hessian: Optional[Any] = None
    sharpness: Optional[Any] = None


# ---------------------------------------------------------------- the whole run
@dataclass
class RunConfig:
    seed: int = 0
    task: str = "train"  # which runner: train, or an experiment's own task
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    # One entry per active regularizer, keyed by its name (``regularizer=[a,b]``).
    regularizer: Dict[str, Any] = field(default_factory=dict)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # In-process sweeps (task=sweep and the experiments built on it).
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Free-form settings of experiment tasks (gallery figures ...); each task validates its own.
    extra: Dict[str, Any] = field(default_factory=dict)


MODEL_SCHEMAS = {"mlp": MLPConfig, "cnn": CNNConfig, "gru": GRUConfig, "transformer": TransformerConfig}
OPTIMIZER_SCHEMAS = {
    "sgd": SGDConfig, "momentum": SGDConfig, "nesterov": SGDConfig,
    "adagrad": AdagradConfig, "rmsprop": RMSpropConfig, "adadelta": AdadeltaConfig,
    "adam": AdamConfig, "adamw": AdamConfig, "sam": SAMConfig,
}
SAM_BASES = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULERS = ("constant", "step", "cosine", "warmup_cosine", "cosine_restarts")
DATASETS = ("mnist1d", "mnist", "fashion_mnist", "cifar10")


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    from regexp.probes import PROBES
    from regexp.regularizers import REGULARIZERS

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="model", name=f"base_{name}", node=schema)
    for name, schema in OPTIMIZER_SCHEMAS.items():
        cs.store(group="optimizer", name=f"base_{name}", node=schema)
    cs.store(group="scheduler", name="base_scheduler", node=SchedulerConfig)
    for name, reg in REGULARIZERS.items():
        cs.store(group="regularizer", name=f"base_{name}", node=reg.Config,
                 package=f"regularizer.{name}")
    for name, probe in PROBES.items():
        cs.store(group="probe", name=f"base_{name}", node=probe.Config, package=f"probe.{name}")


# ---------------------------------------------------------------- range checks
def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")


def _choice(key: str, value: Any, options) -> None:
    _check(value in options, key, value, "one of " + ", ".join(map(str, options)))


def check_ranges(ranges: Dict[str, Tuple[Any, str]], cfg: Any, prefix: str) -> None:
    """Each ``key -> (predicate, description of valid values)`` of a regularizer's or probe's
    ``ranges``, on its config node ``prefix``."""
    for key, (ok, valid) in ranges.items():
        _check(ok(cfg[key]), f"{prefix}.{key}", cfg[key], valid)


# numpy's global seed (np.random.seed) takes 0 <= seed < 2**32; torch and random take more, so
# this is the range in which one seed means the same thing to every generator a run seeds.
SEED_RANGE = "an integer in [0, 2**32 - 1 = 4294967295] (numpy's seed range)"


def _seed_ok(seed: Any) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32


# Sub-configs whose keys are free-form on purpose (experiments put their own settings there).
FREE_FORM = ("extra",)


def unknown_key_message(key: str, where: str, valid: Sequence[str]) -> str:
    """The one line for a key that its schema does not have (shared with the CLI's handler)."""
    return f"{key} is not a key of {where}: expected one of {', '.join(valid)}"


def describe_node(path: str, node: DictConfig) -> str:
    """How an error names a node: ``the config``, ``trainer``, or a group with its option
    (``model=mlp``)."""
    if not path:
        return "the config"
    name = node._get_node("name") if "name" in node else None
    if name is not None and not name._is_missing() and not name._is_interpolation() \
            and isinstance(name._value(), str) and path in ("data", "model", "optimizer", "scheduler"):
        return f"{path}={name._value()}"
    return path


def _schema_fields(node: DictConfig) -> Optional[List[str]]:
    schema = OmegaConf.get_type(node)
    if schema is not None and dataclasses.is_dataclass(schema):
        return [f.name for f in dataclasses.fields(schema)]
    return None


def check_known_keys(cfg: DictConfig, path: str = "") -> None:
    """Refuse keys that a schema'd node does not declare.

    ``+group.key=value`` (and ``++``) force-add a key even to a structured (struct-flagged)
    node: Hydra merges such overrides with ``force_add=True``, which bypasses the struct flag.
    So a typo such as ``+trainer.epoch=5`` would compose and be silently ignored; this walks
    the composed config and raises ConfigError for any key its dataclass does not have.
    Dict-typed nodes (``regularizer``, ``sweep.params``, ``extra``) may hold any key, but
    schema'd nodes inside them (``regularizer.<name>``) are checked.
    """
    fields = _schema_fields(cfg)
    for key in cfg.keys():
        full = f"{path}.{key}" if path else str(key)
        if not path and key == "hydra" or full in FREE_FORM:
            continue
        if fields is not None and key not in fields:
            raise ConfigError(unknown_key_message(full, describe_node(path, cfg), fields))
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none() \
                and not child._is_interpolation():
            check_known_keys(child, full)


def _leaves(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf below ``node``, in config order; missing values and
    interpolations that do not resolve are left to whoever reads them."""
    if isinstance(node, DictConfig):
        if node._is_missing() or node._is_none() or node._is_interpolation():
            return
        items = [(k, f"{path}.{k}" if path else str(k)) for k in node.keys()]
    elif isinstance(node, ListConfig):
        if node._is_missing() or node._is_none() or node._is_interpolation():
            return
        items = [(i, f"{path}[{i}]") for i in range(len(node))]
    else:
        return
    for k, full in items:
        if not path and k == "hydra":
            continue
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _leaves(child, full)
            continue
        if child is None or child._is_missing():
            continue
        try:
            value = node[k]
        except Exception:  # an interpolation that does not resolve: reported where it is used
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _leaves(value, full)
        else:
            yield full, value


def check_finite(cfg: DictConfig) -> None:
    """Refuse inf and nan anywhere in the config (``optimizer.lr=inf`` passes ``lr > 0``)."""
    for key, value in _leaves(cfg, ""):
        check_finite_value(key, value)


def check_finite_value(key: str, value: Any) -> None:
    """Refuse an inf or nan ``value`` of ``key`` (a number, or a list of them)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, (list, tuple)):
            check_finite_value(key, v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v!r} is invalid: expected a finite number")


def _override_values(override: Any) -> List[Any]:
    """The value(s) an override sets: one, or each of a sweep's (``-m``) values."""
    if override.is_sweep_override():
        try:
            return list(override.sweep_iterator())
        except Exception:  # e.g. glob(), which needs the config loader: Hydra reports its errors
            return []
    return [override.value()]


# Groups chosen as a list (``regularizer=[a,b]``), each entry composed into ``<group>.<name>``.
LIST_GROUPS = ("regularizer", "probe")


def check_overrides(overrides: Sequence[str]) -> None:
    """Check the command line's overrides before Hydra composes them; raise ConfigError.

    - a malformed override (``model.channels=[1,2``): Hydra's parser error does not name it;
      this names the key and the override.
    - a regularizer or probe listed twice (``regularizer=[dropout,dropout]``): Hydra composes
      both entries into the one ``regularizer.dropout`` node, so the second would silently vanish.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except HydraException as e:
            raise ConfigError(override_parse_message(line, e)) from None
        group = override.key_or_group
        if group not in LIST_GROUPS or override.package is not None or override.is_delete():
            continue
        for value in _override_values(override):
            names = list(value) if isinstance(value, (list, tuple)) else [value]
            seen = set()
            for name in names:
                if name in seen:
                    raise ConfigError(
                        f"{group}={_fmt_list(names)} is invalid: {name} is listed twice; "
                        f"expected each {group} at most once (set its parameters with "
                        f"{group}.{name}.KEY=VALUE)")
                seen.add(name)


def _fmt_list(values: Sequence[Any]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


GRAMMAR_URL = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"


def override_parse_message(line: str, error: Exception) -> str:
    """One line for an override Hydra cannot parse, naming its key."""
    key = line.split("=", 1)[0].lstrip("+~").strip() or line
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if detail.startswith("LexerNoViableAltException"):
        detail = "unexpected character"
    return (f"{key}: cannot parse the override {line!r} ({detail}): expected "
            f"KEY=VALUE in Hydra's override grammar, see {GRAMMAR_URL}")


def check_optimizer(o: DictConfig, where: str = "optimizer") -> None:
    """The ranges of an optimizer's hyperparameters; ``where`` prefixes the key in the message
    (experiments that set several optimizers' keys name their own ``extra.*`` entry)."""
    _check(o.lr > 0, f"{where}.lr", o.lr, "a number > 0")
    for key in ("momentum", "alpha", "rho", "beta1", "beta2", "dampening"):
        if key in o and not (key == "rho" and o.name == "sam"):  # SAM's rho is a radius
            _check(0.0 <= o[key] < 1.0, f"{where}.{key}", o[key], "a number in [0, 1)")
    if "eps" in o:
        _check(o.eps >= 0, f"{where}.eps", o.eps, "a number >= 0")
    if o.name == "sam":
        _choice(f"{where}.base", o.base, SAM_BASES)
        _check(o.rho > 0, f"{where}.rho", o.rho, "a number > 0 (the radius of SAM's ascent step)")
        _check(o.eta >= 0, f"{where}.eta", o.eta, "a number >= 0")
    for key in ("weight_decay", "initial_accumulator_value"):
        if key in o:
            _check(o[key] >= 0, f"{where}.{key}", o[key], "a number >= 0")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stage_values(m: DictConfig, key: str, low: int) -> List[int]:
    """``model.<key>`` of a CNN as one integer per stage (a scalar means every stage); the
    padding's None is each stage's ``kernel_size // 2``. Raises ConfigError naming the key."""
    n = len(m.channels)
    value = m[key]
    if key == "padding" and value is None:
        return [k // 2 for k in stage_values(m, "kernel_size", 1)]
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value] * n
    valid = (f"an integer >= {low} or a list of {n} of them, one per entry of model.channels"
             + (", or null (kernel_size // 2)" if key == "padding" else ""))
    _check(len(values) == n and all(_int(v) and v >= low for v in values), f"model.{key}",
           OmegaConf.to_container(value) if isinstance(value, ListConfig) else value, valid)
    return values


def validate(cfg: DictConfig, walk: bool = True) -> None:
    """Check a composed config; raise ConfigError naming the first bad key.

    In order: keys no schema declares (``+trainer.nosuch=1``), non-finite numbers anywhere
    (these two walk the whole tree; ``walk=False`` skips them, for a sweep point whose base
    passed them, see ``regexp.sweep.checked_config``), then the ranges of each group.
    """
    from regexp.data.random_inputs import MODES as RANDOM_INPUT_MODES
    from regexp.models import ACTIVATIONS, INITS, NORMS
    from regexp.probes import PROBES
    from regexp.regularizers import REGULARIZERS

    if walk:
        check_known_keys(cfg)
        check_finite(cfg)
    _check(_seed_ok(cfg.seed), "seed", cfg.seed, SEED_RANGE)
    if "sweep" in cfg:
        for i, seed in enumerate(cfg.sweep.seeds):
            _check(_seed_ok(seed), f"sweep.seeds[{i}]", seed, SEED_RANGE)
        shards = cfg.sweep.get("shards", 1)
        _check(shards >= 1, "sweep.shards", shards, "an integer >= 1 (the number of jobs sharing the grid)")
        _check(0 <= cfg.sweep.get("shard", 0) < shards, "sweep.shard", cfg.sweep.get("shard", 0),
               f"an integer in [0, {shards - 1}] (sweep.shards={shards})")

    d = cfg.data
    _choice("data.name", d.name, DATASETS)
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a number in [0, 1)")
    _check(0.0 <= d.label_noise <= 1.0, "data.label_noise", d.label_noise, "a number in [0, 1]")
    _choice("data.random_inputs", d.random_inputs, RANDOM_INPUT_MODES)
    _check(d.n_train is None or d.n_train >= 1, "data.n_train", d.n_train, "an integer >= 1 or null")
    _check(d.n_test is None or d.n_test >= 1, "data.n_test", d.n_test, "an integer >= 1 or null")
    _check(d.folds == 0 or d.folds >= 2, "data.folds", d.folds, "0 (no cross-validation) or an integer >= 2")
    _check(0 <= d.fold < max(d.folds, 1), "data.fold", d.fold, f"an integer in [0, {max(d.folds, 1) - 1}]")
    _check(d.split_seed is None or _seed_ok(d.split_seed), "data.split_seed", d.split_seed,
           SEED_RANGE + " or null")

    m = cfg.model
    _choice("model.name", m.name, tuple(MODEL_SCHEMAS))
    if "activation" in m:
        _choice("model.activation", m.activation, tuple(ACTIVATIONS))
    _choice("model.init", m.init, tuple(INITS))
    if "norm" in m:
        norms = NORMS[m.name]
        _choice("model.norm", m.norm, norms)
    if m.name == "mlp":
        _check(m.width >= 1, "model.width", m.width, "an integer >= 1")
        _check(m.depth >= 0, "model.depth", m.depth, "an integer >= 0 (0: logistic regression)")
        widths = m.get("widths")
        _check(widths is None or all(_int(w) and w >= 1 for w in widths), "model.widths",
               OmegaConf.to_container(widths) if isinstance(widths, ListConfig) else widths,
               "null (depth layers of model.width) or a list of integers >= 1, one per hidden layer "
               "(e.g. [40,20,20]; [] is logistic regression)")
    elif m.name == "cnn":
        _check(len(m.channels) >= 1 and all(c >= 1 for c in m.channels), "model.channels",
               list(m.channels), "a non-empty list of integers >= 1")
        for key, low in (("kernel_size", 1), ("stride", 1), ("padding", 0)):
            stage_values(m, key, low)
        _choice("model.pool", m.pool, ("max", "avg", "none"))
        _choice("model.head", m.head, ("gap", "flatten"))
    elif m.name == "gru":
        _check(m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "an integer >= 1")
        _check(m.layers >= 1, "model.layers", m.layers, "an integer >= 1")
        _choice("model.head", m.head, ("flatten", "last"))
        _check(m.init == "default", "model.init", m.init,
               "default (model=gru keeps PyTorch's GRU initialization)")
    elif m.name == "transformer":
        _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "an integer >= 1")
        _check(m.depth >= 1, "model.depth", m.depth, "an integer >= 1")
        _check(m.heads >= 1 and m.embed_dim % m.heads == 0, "model.heads", m.heads,
               f"an integer >= 1 that divides model.embed_dim={m.embed_dim}")
        _check(m.patch_size is None or m.patch_size >= 1, "model.patch_size", m.patch_size,
               "an integer >= 1 or null")
        # the feed-forward block has int(embed_dim * mlp_ratio) hidden units (models/transformer.py)
        _check(m.mlp_ratio > 0 and int(m.embed_dim * m.mlp_ratio) >= 1, "model.mlp_ratio", m.mlp_ratio,
               f"a number > 0 giving int(model.embed_dim * model.mlp_ratio) >= 1 hidden units "
               f"(model.embed_dim={m.embed_dim})")
    if "init_std" in m:
        _check(m.init_std > 0, "model.init_std", m.init_std, "a number > 0")
    if m.get("init_a") is not None:
        _check(m.init_a > 0, "model.init_a", m.init_a, "a number > 0 or null (1/sqrt(fan_in))")

    o = cfg.optimizer
    _choice("optimizer.name", o.name, tuple(OPTIMIZER_SCHEMAS))
    check_optimizer(o)

    s = cfg.scheduler
    _choice("scheduler.name", s.name, SCHEDULERS)
    _check(s.warmup_steps >= 0, "scheduler.warmup_steps", s.warmup_steps, "an integer >= 0")
    _check(0.0 <= s.min_lr_ratio <= 1.0, "scheduler.min_lr_ratio", s.min_lr_ratio, "a number in [0, 1]")
    _check(s.step_size >= 1, "scheduler.step_size", s.step_size, "an integer >= 1")
    _check(s.gamma > 0, "scheduler.gamma", s.gamma, "a number > 0")
    _check(s.period >= 1, "scheduler.period", s.period, "an integer >= 1")
    _check(s.period_mult >= 1.0, "scheduler.period_mult", s.period_mult, "a number >= 1")

    t = cfg.trainer
    _check(t.epochs >= 1, "trainer.epochs", t.epochs, "an integer >= 1")
    bs = t.batch_size
    _check(bs == "full" or (isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1),
           "trainer.batch_size", bs, 'an integer >= 1 or "full"')
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _check(t.eval_every >= 1, "trainer.eval_every", t.eval_every, "an integer >= 1")
    _check(t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "a number > 0 or null")
    _check(t.threads == "auto" or (isinstance(t.threads, int) and not isinstance(t.threads, bool)
                                   and t.threads >= 1), "trainer.threads", t.threads, 'an integer >= 1 or "auto"')
    _check(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 0")
    _check(t.eval_batch_size >= 1, "trainer.eval_batch_size", t.eval_batch_size, "an integer >= 1")
    _check(cfg.logger.histogram_every >= 0, "logger.histogram_every", cfg.logger.histogram_every,
           "an integer >= 0")

    for name, rcfg in cfg.regularizer.items():
        _choice("regularizer", name, tuple(REGULARIZERS))
        REGULARIZERS[name].validate(rcfg, f"regularizer.{name}")

    p = cfg.probe
    _check(p.every >= 0, "probe.every", p.every, "an integer >= 0 (epochs between probes; 0: only at the end)")
    _check(p.batch_size >= 2, "probe.batch_size", p.batch_size, "an integer >= 2")
    for name, probe in PROBES.items():
        if p[name] is not None:
            probe.validate(p[name], f"probe.{name}")


class ValidateOnRunStart(Callback):
    """Hydra callback: validate a single run's config before Hydra creates its folder.

    :func:`regexp.tasks.run_task` validates too, but by then Hydra has made the run folder
    and written ``.hydra/`` into it; this refuses bad input before anything is written. Listed
    under ``hydra.callbacks`` (configs/hydra/default.yaml); a multirun's jobs are still checked
    one by one in run_task, so one bad point does not stop the others. Hydra turns a
    callback's exception into a warning and goes on, so this reports the error itself (the
    same ``error:`` line and exit status 2 as run_task) and exits.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from regexp.train.rundir import check_output_folder

        _refuse_now(lambda: (check_output_folder("hydra.run.dir", config.hydra.run.dir), validate(config)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from regexp.train.rundir import check_output_folder

        _refuse_now(lambda: check_output_folder("hydra.sweep.dir", config.hydra.sweep.dir))


def _refuse_now(check) -> None:
    import sys

    try:
        check()
    except ConfigError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_container(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
