"""Run configuration: frozen dataclasses validated where they are built.

A config is a tree of dataclasses. ``RunConfig.from_dict`` refuses unknown keys and wrong types with a
message that names the dotted field and says how to fix it; ``RunConfig.to_dict`` gives back plain data
for config.yaml. Every key, its default and meaning is listed in docs/config.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from .config_cluster import ClusterConfig
from .config_parse import (
    ConfigError,
    apply_renames,
    build_section,
    one_of,
    parse_override,
    plain_data,
    renamed_key,
    require,
    set_dotted,
)

# Every choice a config offers is declared once, as a Literal type (here; the cluster section's in config_cluster.py);
# its values as a tuple are what the config checks and what the modules that act on the choice (zo/,
# distributed/) import and check against.
EvalSplit = Literal["validation", "test"]
Trainable = Literal["all", "head", "bitfit", "lora", "top_k", "patterns"]
Autocast = Literal["fp32", "bf16", "fp16"]
Distribution = Literal["gaussian", "rademacher", "sphere", "table", "lowrank"]
Mechanism = Literal["hooks", "swap", "naive"]
NoiseSource = Literal["generator", "philox"]
SigmaWarmup = Literal["abs_gamma", "skip", "unit"]
Clip = Literal["soft", "fixed", "none"]
Decay = Literal["constant", "linear", "cosine", "inverse_sqrt", "step"]
WeightDecayExempt = Literal["bias_norm", "none"]
StepScalingKind = Literal["linear", "sqrt", "none"]
WeightPrecision = Literal["fp32", "bf16", "fp16"]

EVAL_SPLITS: tuple[str, ...] = get_args(EvalSplit)
TRAINABLE: tuple[str, ...] = get_args(Trainable)
AUTOCASTS: tuple[str, ...] = get_args(Autocast)
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
MECHANISMS: tuple[str, ...] = get_args(Mechanism)
NOISE_SOURCES: tuple[str, ...] = get_args(NoiseSource)
COUNTER_DISTRIBUTIONS = ("gaussian", "lowrank")  # what perturbation.noise: philox makes
WANDB_MODES = ("", "offline", "online")
SIGMA_WARMUPS: tuple[str, ...] = get_args(SigmaWarmup)
CLIPS: tuple[str, ...] = get_args(Clip)
DECAYS: tuple[str, ...] = get_args(Decay)


@dataclass(frozen=True)
class TaskConfig:
    """What is trained: model, data, loss and which parameters move."""

    name: str = "text_classification"
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    num_labels: int | None = None
    max_length: int = 64
    batch_size: int = 16
    train_size: int | None = None
    eval_size: int = 512           # validation examples (what tuning reads)
    test_size: int = 0             # test examples (what final tables report); 0: no test split
    split_seed: int = 0            # fixes the train / validation / test split; never the run seed
    eval_split: EvalSplit = "validation"  # the split a run evaluates: validation or test
    k_shot: int | None = None
    reshuffle: bool = True
    template: str = "{text} It was"
    label_words: tuple[str, ...] = (" terrible", " great")
    trainable: Trainable = "all"
    top_k: int = 1
    patterns: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ()
    lora_blocks: int = 0           # LoRA in the last N blocks only (the prefix below stays cacheable); 0: every block
    autocast: Autocast = "fp32"  # the forward's autocast dtype (weights: precision.weights)
    feature_reuse: bool = True
    trust_remote_code: bool = False
    device_map: str | None = None
    tiny_width: int = 64
    tiny_layers: int = 2
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "task.batch_size", f"got {self.batch_size}", "use a positive batch size")
        require(self.max_length > 1, "task.max_length", f"got {self.max_length}", "use at least 2 tokens")
        require(self.eval_size >= 0, "task.eval_size", f"got {self.eval_size}", "use 0 or more")
        require(self.test_size >= 0, "task.test_size", f"got {self.test_size}", "use 0 (no test split) or more")
        require(0 <= self.split_seed < 2**63, "task.split_seed", f"got {self.split_seed}",
                 "use an integer in [0, 2**63)")
        require(self.eval_split in EVAL_SPLITS, "task.eval_split", f"unknown split {self.eval_split!r}",
                 "use validation (tuning) or test (final reports)")
        require(self.eval_split != "test" or self.test_size > 0, "task.eval_split",
                 "test while task.test_size is 0 (there is no test split)",
                 "set task.test_size to the number of test examples")
        require(self.k_shot is None or self.k_shot > 0, "task.k_shot", f"got {self.k_shot}", "use a positive count or null")
        require(self.trainable in TRAINABLE, "task.trainable", f"unknown value {self.trainable!r}",
                 f"use one of {', '.join(TRAINABLE)}")
        require(self.trainable != "patterns" or bool(self.patterns), "task.patterns", "empty while trainable=patterns",
                 "list name patterns (fnmatch) of the parameters to train")
        require(self.autocast in AUTOCASTS, "task.autocast", f"unknown value {self.autocast!r}",
                 f"use {one_of(AUTOCASTS)}")
        require(self.top_k > 0, "task.top_k", f"got {self.top_k}", "use a positive number of layers")
        require(self.lora_blocks >= 0, "task.lora_blocks", f"got {self.lora_blocks}",
                 "use 0 (adapters in every block) or a positive number of last blocks")
        require(self.device_map in (None, "auto", "balanced", "sequential"), "task.device_map",
                 f"got {self.device_map!r}", "use null, auto, balanced or sequential (with cluster.gpus_per_replica > 1)")


# The first-order references (backprop SGD / AdamW): the one place their names are written.
FIRST_ORDER = ("sgd", "adamw")
ZEROTH_ORDER = ("vs2p", "s2p", "mezo", "zo_sign", "zo_signsgd", "stp", "random_search")
OPTIMIZERS = ZEROTH_ORDER + FIRST_ORDER
# A first-order step is one forward and one backward (about two forwards): 3 forward-pass
# equivalents, the unit in which metrics and equal-budget comparisons count its cost.
FIRST_ORDER_PASSES = 3
# Which parameters weight decay spares (zo/weight_decay.py): bias_norm as MeZO's trainer, or none.
WEIGHT_DECAY_EXEMPT: tuple[str, ...] = get_args(WeightDecayExempt)
# How a step's move grows with Q, the directions it evaluates (zo/rules/scaling.py): Q / Q_tuned,
# sqrt(Q / Q_tuned) or 1.
STEP_SCALINGS: tuple[str, ...] = get_args(StepScalingKind)


# Keys that were renamed: (section, old key) -> new key, and why. A config (or --set) that uses an old name
# still works, with one FutureWarning line naming the new one; giving both names is refused. Run directories
# written before a rename load silently (config_history.saved_config).
RENAMED: dict[tuple[str, str], str] = {("task", "precision"): "autocast"}
RENAMED_WHY = {("task", "precision"): "the forward's autocast dtype; the weights' dtype is precision.weights"}


@dataclass(frozen=True)
class OptimizerConfig:
    """Update rule and its hyperparameters (see docs/method.md)."""

    name: str = "vs2p"
    lr: float = 1e-3            # MeZO / ZO-signSGD / first-order learning rate; S2P option-1 step size
    eta: float = 1.0            # VS2P / S2P option-2 scale
    rho: float = 1e-3           # probe radius
    directions: int = 1         # q directions per replica per step (averaged)
    step_scaling: StepScalingKind = "linear"  # the step grows with the directions per step Q: linear, sqrt or none
    tuned_directions: int = 1   # the Q at which lr / eta are meant as written (the step factor is 1 there)
    weight_decay: float = 0.0
    weight_decay_exempt: WeightDecayExempt = "bias_norm"  # bias_norm (as MeZO: biases and norm weights do not decay) or none
    sign_trick: bool = True     # S2P: reuse the +-rho probes to pick the direction
    step_size_option: int = 1   # S2P: 1..4 (paper's options)
    tau_a: float = 3.0
    tau_b: float = 3.0
    beta: float = 1.0
    sigma_window: int = 16
    sigma_ddof: int = 0
    sigma_include_current: bool = False
    sigma_warmup: SigmaWarmup = "abs_gamma"
    clip: Clip = "soft"         # VS2P: soft (sigma), fixed, none
    clip_threshold: float = 1.0
    decay: Decay = "constant"
    decay_final: float = 0.0
    decay_steps: int | None = None
    smooth_l0: float = 1.0
    smooth_l1: float = 1.0
    smooth_a: float = 1.01
    smooth_b: float = 1.01
    top_b: int | None = None    # random search: keep the b best of the directions
    max_bad_losses: int = 20    # consecutive non-finite probe losses before the run stops

    def __post_init__(self) -> None:
        require(self.name in OPTIMIZERS, "optimizer.name", f"unknown optimizer {self.name!r}",
                 f"use one of {', '.join(OPTIMIZERS)}")
        for key in ("lr", "eta", "rho", "tau_a", "tau_b", "beta"):
            value = getattr(self, key)
            require(value > 0, f"optimizer.{key}", f"must be > 0, got {value}", "use a positive number")
        require(self.directions >= 1, "optimizer.directions", f"got {self.directions}", "use 1 or more")
        require(self.step_scaling in STEP_SCALINGS, "optimizer.step_scaling", f"got {self.step_scaling!r}",
                 "use linear (the step grows with the directions per step), sqrt, or none (plain q-average)")
        require(self.tuned_directions >= 1, "optimizer.tuned_directions", f"got {self.tuned_directions}",
                 "use the directions per step (groups x directions) at which lr / eta were tuned, 1 or more")
        require(self.step_size_option in (1, 2, 3, 4), "optimizer.step_size_option",
                 f"got {self.step_size_option}", "use 1, 2, 3 or 4")
        require(self.weight_decay >= 0, "optimizer.weight_decay", f"got {self.weight_decay}", "use 0 or more")
        require(self.weight_decay_exempt in WEIGHT_DECAY_EXEMPT, "optimizer.weight_decay_exempt",
                 f"got {self.weight_decay_exempt!r}",
                 "use bias_norm (biases and norm weights do not decay, as MeZO) or none (every parameter decays)")
        require(self.sigma_window >= 2, "optimizer.sigma_window", f"got {self.sigma_window}", "use 2 or more")
        require(self.clip in CLIPS, "optimizer.clip", f"got {self.clip!r}", f"use {one_of(CLIPS)}")
        require(self.sigma_warmup in SIGMA_WARMUPS, "optimizer.sigma_warmup", f"got {self.sigma_warmup!r}",
                 f"use {one_of(SIGMA_WARMUPS)}")
        require(self.decay in DECAYS, "optimizer.decay", f"got {self.decay!r}", f"use {one_of(DECAYS)}")
        require(self.max_bad_losses >= 1, "optimizer.max_bad_losses", f"got {self.max_bad_losses}", "use 1 or more")


@dataclass(frozen=True)
class PerturbationConfig:
    """How directions are generated and applied."""

    distribution: Distribution = "gaussian"  # gaussian, rademacher, sphere, table, lowrank
    mechanism: Mechanism = "hooks"    # hooks (module at a time), swap (whole model), naive (in-place round trip)
    table_size: int = 1 << 24         # floats in the shared noise table (distribution=table)
    rank: int = 2                     # r of the low-rank directions U V^T / sqrt(r) (distribution=lowrank)
    lowrank_interval: int = 1         # lazy V: redraw V every this many steps (1: fresh V per direction)
    noise: NoiseSource = "generator"  # generator (seeded torch generators), philox (counter-based, fused GPU kernels)

    def __post_init__(self) -> None:
        require(self.distribution in DISTRIBUTIONS, "perturbation.distribution", f"got {self.distribution!r}",
                 f"use {one_of(DISTRIBUTIONS)}")
        require(isinstance(self.rank, int) and self.rank >= 1, "perturbation.rank", f"got {self.rank!r}",
                 "use a positive integer (1-4 is typical)")
        require(isinstance(self.lowrank_interval, int) and self.lowrank_interval >= 1,
                 "perturbation.lowrank_interval", f"got {self.lowrank_interval!r}",
                 "use 1 (fresh V with every direction) or more (V kept for that many steps)")
        require(self.mechanism in MECHANISMS, "perturbation.mechanism", f"got {self.mechanism!r}",
                 f"use {one_of(MECHANISMS)}")
        require(self.table_size >= 1024, "perturbation.table_size", f"got {self.table_size}", "use at least 1024")
        require(self.noise in NOISE_SOURCES, "perturbation.noise", f"got {self.noise!r}", f"use {one_of(NOISE_SOURCES)}")
        require(self.noise == "generator" or self.distribution in COUNTER_DISTRIBUTIONS, "perturbation.noise",
                 f"philox makes Gaussian and low-rank directions, not {self.distribution}",
                 "use perturbation.distribution gaussian or lowrank with philox, or perturbation.noise generator")


WEIGHT_PRECISIONS: tuple[str, ...] = get_args(WeightPrecision)


@dataclass(frozen=True)
class PrecisionConfig:
    """The dtype the replicas keep their weights in (``task.autocast`` is the forward's autocast)."""

    weights: WeightPrecision = "fp32"  # fp32, or bf16 / fp16: 2 bytes per parameter, updates rounded stochastically

    def __post_init__(self) -> None:
        require(self.weights in WEIGHT_PRECISIONS, "precision.weights", f"got {self.weights!r}",
                 "use fp32, bf16 or fp16 (task.autocast is the forward's autocast, a different setting)")


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    seed: int = 0
    steps: int = 1000
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False
    mlflow: str = ""                  # MLflow tracking URI ("" off; a local store: file:/path/mlruns)
    wandb: str = ""                   # Weights & Biases: "" off, offline (local files, wandb sync) or online
    task: TaskConfig = field(default_factory=TaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**63, "seed", f"got {self.seed}", "use an integer in [0, 2**63)")
        require(self.steps > 0, "steps", f"got {self.steps}", "use a positive number of steps")
        require(self.eval_every >= 0, "eval_every", f"got {self.eval_every}", "use 0 (end only) or more")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"got {self.checkpoint_every}", "use 0 (end only) or more")
        require(self.log_every > 0, "log_every", f"got {self.log_every}", "use a positive interval")
        require(self.wandb in WANDB_MODES, "wandb", f"got {self.wandb!r}",
                 "use '' (off), offline (local run files, uploaded later by wandb sync) or online")
        c = self.cluster
        shards = c.replicas // self.direction_groups
        require(c.batch_scaling == "weak" or c.mode == "direction" or self.task.batch_size % shards == 0,
                 "cluster.batch_scaling", f"strong: task.batch_size {self.task.batch_size} does not split evenly "
                 f"among {shards} data shards", "use a task.batch_size divisible by the shards per group, or weak")
        if c.elastic and c.mode != "direction":  # the batch is re-cut among the replicas present: every cut even
            cuts = sorted({n for r in range(c.min_replicas, c.replicas + 1)
                           for n in (r // self.direction_groups, -(-r // self.direction_groups))})
            uneven = [n for n in cuts if self.task.batch_size % n]
            require(not uneven, "task.batch_size", f"{self.task.batch_size} does not split evenly among {uneven} data "
                    f"shards, which a group has with {c.min_replicas}-{c.replicas} replicas present",
                    f"use a task.batch_size divisible by each of {cuts}, or a narrower cluster.min_replicas")
        require(self.perturbation.noise == "generator" or self.precision.weights in ("fp32", "bf16"),
                 "perturbation.noise", f"philox handles fp32 and bf16 weights, not precision.weights "
                 f"{self.precision.weights}", "use precision.weights fp32 or bf16, or perturbation.noise generator")

    @property
    def direction_groups(self) -> int:
        """Groups of replicas that probe their own directions: every replica (direction mode), one (data),
        ``cluster.groups`` (hybrid)."""
        return {"direction": self.cluster.replicas, "data": 1, "hybrid": self.cluster.groups}[self.cluster.mode]

    @property
    def directions_per_step(self) -> int:
        """Q, the directions a step evaluates: direction groups x ``optimizer.directions``."""
        return self.direction_groups * self.optimizer.directions

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples) for YAML/JSON."""
        return plain_data(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RunConfig":
        """Build and validate a config from nested plain data.

        Raises:
            ConfigError: on an unknown key, a key given under both its old and new name (``RENAMED``),
                a wrong type or a bad value.
        """
        data = apply_renames(data or {}, RENAMED, RENAMED_WHY)
        return build_section(cls, data, "")

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied, e.g. {"optimizer.lr": 0.1}."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            set_dotted(data, renamed_key(dotted, RENAMED, RENAMED_WHY), value)
        return RunConfig.from_dict(data)


DEFAULT_JOB = Path(__file__).resolve().parent / "default_job.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (``None``: the embedded default job, ray_s2p/default_job.yaml) and apply
    ``--set`` overrides.

    Raises:
        ConfigError: file missing, not YAML, or an invalid field.
    """
    p = Path(path) if path is not None else DEFAULT_JOB
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist. Fix: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    config = RunConfig.from_dict(data)
    parsed = dict(parse_override(o) for o in overrides or [])
    return config.replace(parsed) if parsed else config
