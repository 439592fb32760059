"""One typed config tree, loaded from YAML.

The model, the loaders, placement and the optimisers receive only their slice (`cfg.model`,
`cfg.data`, `cfg.distributed`, `cfg.optim`); the whole tree goes only to what combines slices
(the Trainer, the run folder, `feature_spec`: columns and the model's use of them). Unknown keys are
errors that name the key; `a.b=c` overrides from the command line are parsed as YAML values
and checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from wdl.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "run"  # the run folder's name, a plain one (a fresh run takes name-1, ... when it is taken)
    out_dir: str = "runs"  # the run folder is out_dir/name
    seed: int = 2021  # seeds initial values, shuffling, dropout and a held-out valid_fraction
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # A collective that waits longer than this fails instead of hanging, so torchrun can restart
    # (long enough for rank 0 to prepare a missing MovieLens set while the others wait).
    collective_timeout_s: int = 600


@dataclass
class ColumnConfig:
    """One input column. Sparse ids come from exactly one of vocab_size / hash_buckets / vocab_file."""

    ONE_OF: ClassVar[tuple[str, ...]] = ("vocab_size", "hash_buckets", "vocab_file")  # the id source

    # categorical: one id per row; multi_hot: a list of ids (e.g. genres), sum-pooled; dense: a number.
    kind: Literal["categorical", "multi_hot", "dense"] = "categorical"
    # Integer ids already in [0, vocab_size); anything else maps to the reserved id 0.
    # "auto" reads the size from the data set's manifest.
    vocab_size: Optional[Union[int, str]] = None
    # Raw ints or strings hashed into this many buckets.
    hash_buckets: Optional[int] = None
    # JSON list of raw values; id = position, unknown values -> 0.
    vocab_file: Optional[str] = None
    # Dense only: standard (train mean/std from the manifest) | log1p | none.
    normalize: Literal["standard", "log1p", "none"] = "standard"
    # Dense: a null's value in raw units, normalised like any value; null (default): the train
    # mean (0 once standardised). The deep part also sees a missing indicator for a column with
    # nulls in the train split.
    fill: Optional[float] = None
    # Dense only: also a categorical id usable in the wide part, crosses and deep embeddings:
    # the bucket of the raw value between these ascending edges (id 1 .. len+1; null -> 0), or
    # "auto": the equal-frequency edges `wdl data import` wrote into the manifest.
    buckets: Optional[Union[list[float], Literal["auto"]]] = None


@dataclass
class CrossConfig:
    """A wide cross-product feature: hash(v_1, ..., v_n) % hash_buckets."""

    columns: list[str] = field(default_factory=list)  # two or more; a multi-hot one gives a cross id per element
    hash_buckets: int = 10_000  # rows of the cross's wide table


@dataclass
class FeaturesConfig:
    label: str = "label"  # the 0/1 target column
    columns: dict[str, ColumnConfig] = field(default_factory=dict)  # every column the model reads, by name
    crosses: dict[str, CrossConfig] = field(default_factory=dict)  # hashed cross-product features, by name
    # A dense column missing in more than this share of the train rows is dropped from the model
    # with a warning (1: none is dropped, and a column missing in every train row is an error).
    max_missing_fraction: float = 1.0


@dataclass
class PrepareConfig:
    """How to create `data.path` when it does not exist yet (so `make train` needs no extra step)."""

    source: Optional[Literal["movielens"]] = None  # null: never prepared; movielens: `wdl data prepare movielens`
    variant: str = "ml-100k"  # which MovieLens: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m


@dataclass
class DataConfig:
    path: str = "data/ml-100k"  # the data set folder (manifest.json, train/ valid/ test/ Parquet shards, vocab/)
    train_split: str = "train"  # the split trained on
    eval_split: str = "test"  # scored every epoch; with a validation split, once at the end (best epoch's model)
    # Model selection: a split of the data set that picks the best evaluation (and early stopping)...
    valid_split: str = ""
    # ... or, instead, this share of the train split held out for it (seeded by run.seed; whole row
    # groups when streaming).
    valid_fraction: float = 0.0
    # Stop at start when more than this share of a vocabulary column's values (in any split) lie
    # outside its vocabulary: they would all train one "unknown" row.
    max_unknown_fraction: float = 0.05
    batch_size: int = 1024  # per rank: the global batch is batch_size * world_size
    eval_batch_size: int = 16384  # rows per rank scored at once in evaluations
    in_memory: bool = True  # hold the (small) data set as tensors on the device
    shuffle_buffer: int = 65536  # rows; streaming mode only
    num_workers: int = 0  # streaming mode: DataLoader worker processes per rank
    # A loader worker that sends no batch for this long ends the run (one line naming it).
    loader_timeout_s: int = 600
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class WideConfig:
    features: list[str] = field(default_factory=list)  # columns and crosses, each an embedding of dim 1


@dataclass
class DeepConfig:
    embeddings: dict[str, int] = field(default_factory=dict)  # sparse column -> embedding dim
    dense: list[str] = field(default_factory=list)  # dense columns appended (normalised) to the MLP input
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64])  # the MLP's hidden widths, ReLU after each
    dropout: float = 0.0  # dropout after each hidden layer, training only
    init_std: float = 0.01  # N(0, std) embeddings; PyTorch's default N(0, 1) overfits badly
    # Explicit second-order interactions between the pooled embeddings (wdl/model/interactions.py):
    # none (Wide & Deep as in the paper) | dot (pairwise dot products appended to the MLP input, as
    # in DLRM) | fm (the sum of the pairwise dot products added to the logit, as in DeepFM).
    interaction: Literal["none", "dot", "fm"] = "none"
    # Only these pairs, e.g. [[user_id, movie_id]]; empty: every pair of embedded features. The two
    # features of a pair need the same embedding dimension.
    interaction_pairs: list[list[str]] = field(default_factory=list)
    embedding_dropout: float = 0.0  # dropout on the pooled embeddings, training only
    # The MLP's arithmetic: fp32, or bf16 under autocast (its weights stay fp32 masters, the
    # embedding tables and the loss stay fp32). bf16 pays on GPUs; CPUs without bf16 units run it
    # many times slower.
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class ModelConfig:
    kind: Literal["wide_deep", "wide", "deep"] = "wide_deep"  # the model or one of its two ablations
    # Who holds the deep tables: torchrec (FBGEMM kernels, TorchRec's planner), torch (wdl's own
    # fused tables, any device), auto (TorchRec where it imports). The wide part is always wdl's.
    embedding_backend: Literal["auto", "torchrec", "torch"] = "auto"
    wide: WideConfig = field(default_factory=WideConfig)
    deep: DeepConfig = field(default_factory=DeepConfig)
    # How a feature with several ids in a row (a multi_hot column, or a cross with one) is pooled
    # into one value per row, in both parts: sum (default) or mean, e.g. {genres: mean,
    # gender_genres: mean} when an item's effect is the average over its genres, not their sum.
    pooling: dict[str, Literal["sum", "mean"]] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    # The paper's: ftrl for the wide part, adagrad for the deep. On tables every one updates only the
    # rows a batch touches; FBGEMM has no ftrl (deep ftrl needs model.embedding_backend=torch).
    name: Literal["ftrl", "adagrad", "rowwise_adagrad", "adam", "sgd"] = "adam"
    lr: float = 0.001  # learning rate (FTRL's alpha)
    # L2 added to the gradient, e.g. optim.deep.weight_decay=1e-4 (on tables: the touched rows). Not
    # FTRL's (it has l2); TorchRec's fused tables refuse it (model.embedding_backend=torch takes it).
    weight_decay: float = 0.0
    l1: float = 0.0  # FTRL-Proximal (McMahan et al. 2013) L1 strength: sparse wide weights
    # L2 prior on every table row, in the units of the summed batch-mean loss, whatever how often
    # the row is seen: FTRL's own l2 (in its closed form); for the other rules, on wdl's tables
    # (model.embedding_backend=torch), added to a touched row's gradient as l2 * w / (steps that
    # touched it), so a rare row is shrunk as much as a frequent one (frequency-aware; Zhou et al.
    # 2018's mini-batch aware regularisation). Dense layers take weight_decay instead.
    l2: float = 0.0
    beta: float = 1.0  # FTRL's beta; small (0.001) with batch-mean gradients, or the wide part barely learns
    eps: float = 1e-8  # adagrad / adam
    initial_accumulator_value: float = 0.0  # adagrad


@dataclass
class ScheduleConfig:
    """One multiplier on every learning rate (dense layers and tables) but FTRL's, whose rate is
    part of its closed-form weights: a linear warm-up over the first steps, then a decay each time
    the validation metric plateaus."""

    warmup_steps: int = 0  # the multiplier rises linearly from 1/warmup_steps to 1 over these steps
    # After `plateau_patience` evaluations (train.eval_every_steps; by default one per epoch)
    # without a better validation metric (train.early_stopping's metric and min_delta), multiply
    # by `plateau_factor` (1: never); needs a validation split.
    plateau_factor: float = 1.0
    plateau_patience: int = 1  # evaluations without a better validation metric before a decay
    min_scale: float = 0.0  # the plateau decay stops here


@dataclass
class OptimConfig:
    wide: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="ftrl", lr=0.05))
    deep: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adagrad", lr=0.05))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation metric has not improved by min_delta for `patience` evaluations
    (train.eval_every_steps; by default one per epoch)."""

    metric: Literal["auc", "logloss"] = "auc"  # the validation metric that selects the best evaluation
    patience: int = 0  # 0: off (the best evaluation's model is still selected on validation)
    min_delta: float = 0.0  # a smaller improvement does not count as better


@dataclass
class TrainConfig:
    epochs: int = 20  # passes over the train split (train.max_steps may end the run earlier)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    max_steps: int = 0  # stop after this many steps in total (0 = no limit)
    # A "step" record in metrics.jsonl every N steps: the train loss over those steps, rows, rate,
    # samples/s (0: none; the epoch records cover it). The loss is read from the device only then.
    log_every_steps: int = 0
    # Score the validation split (the eval split without one) every N steps; selection, early
    # stopping and the plateau schedule tick on these evaluations (0: at each epoch end).
    eval_every_steps: int = 0
    # Score only the first rows of the split (about this many, the same ones each time) at these
    # evaluations; the test split's final score reads it whole (0: the whole split).
    eval_max_rows: int = 0
    # Stop when the train loss over a log interval (or an epoch) passes this multiple of the
    # constant predictor's logloss (the train split's label entropy): a run that has diverged
    # without reaching inf (0: only a non-finite loss stops it).
    divergence_ratio: float = 10.0
    tensorboard: bool = False  # also write the records to <run folder>/tensorboard (needs tensorboard)
    progress: bool = True  # a bar per epoch, on a terminal only
    # After the epoch is chosen on the rows data.valid_fraction holds out, train a new model on
    # every train row for that many epochs and score the test split once with it, in the run
    # folder's refit/ (wdl/train/refit.py): the run's final model, trained on a tenth more rows.
    refit: bool = False
    # Only evaluate the model state (e.g. a checkpoint given by checkpoint.resume) and write
    # eval.json in the run folder; no training.
    eval_only: bool = False
    # Warm start: begin from another run's model (its run folder, checkpoints folder or a
    # checkpoint), tables grown to this data set's vocabularies (wdl/train/warm_start.py). A
    # resume of this run continues its own checkpoints instead.
    init_from: str = ""
    # Progressive validation: before the first step, score the train split (train.eval_max_rows of
    # it) with the incoming model: an "eval" record at step 0 with before_training: true.
    eval_before_training: bool = False
    # Ranking metrics beside AUC: NDCG@k and Recall@k of each group's (e.g. user's) evaluated rows
    # ranked by score, averaged over groups with a positive. "" = off; else a categorical column
    # the model reads.
    ranking_group: str = ""
    ranking_k: int = 10  # the k of ndcg@k and recall@k
    # torch.compile the deep part's dense computation (interactions, dropout, MLP; not the
    # look-ups) for training: none, or a torch.compile mode (default, reduce-overhead: CUDA
    # graphs on a GPU, max-autotune). The first steps pay the compilation (tens of seconds).
    compile: str = "none"
    # Replay the whole training step (forward, backward, every optimiser update) as one CUDA
    # graph: at small batches a GPU step is bound by launching its few hundred kernels, which a
    # graph launches at once (wdl/train/graphed_step.py). CUDA, model.embedding_backend=torch, one
    # process, train.compile=none. Batches, in memory or streamed, are cut with fixed shapes for it
    # (multi-hot columns padded); a batch of other shapes (an epoch's last) is stepped as usual.
    cuda_graph: bool = False
    # TorchRec's TrainPipelineSparseDist drives the steps: the next batch's input distribution
    # (the all-to-all of its ids to the ranks holding its rows) overlaps this step's compute.
    # auto: on with TorchRec tables on CUDA and several processes (there is nothing to overlap on
    # one process, nor on CPU, which has no streams); none: the plain loop; sparse_dist: always
    # (model.embedding_backend=torchrec; on CPU it gives the plain loop's results).
    pipeline: Literal["auto", "none", "sparse_dist"] = "auto"
    # torch's intra-op CPU threads per rank. 0: wdl chooses (the host's cores per local rank less
    # the loader workers, fewer while other processes load them; wdl/distributed/threads.py), or
    # OMP_NUM_THREADS when the environment sets it; N: exactly N.
    threads: int = 0


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")


@dataclass
class DistributedConfig:
    """How embedding tables are placed across ranks (TorchRec backend)."""

    # Default for every table: auto lets TorchRec's planner choose among what the device
    # supports; or one of SHARDING_TYPES. row_wise / table_row_wise need CUDA.
    sharding: str = "auto"
    # Per-table override, e.g. {deep_user_id: column_wise}. TorchRec's tables are the deep ones,
    # named deep_<feature>; the wide part is wdl's own fused table, split row-wise over ranks.
    tables: dict[str, str] = field(default_factory=dict)

    def sharding_of(self, table: str) -> tuple[str, str]:
        """(sharding type asked for `table`, the config key that asks it)."""
        if table in self.tables:
            return self.tables[table], f"distributed.tables.{table}"
        return self.sharding, "distributed.sharding"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N steps (0: only at epoch ends)
    at_epoch_end: bool = True  # save at each epoch's end
    keep: int = 3  # newest complete checkpoints kept
    dir: str = ""  # default: <run folder>/checkpoints
    resume: str = ""  # "" (start fresh) | auto (newest complete checkpoint of the run) | a checkpoint or run folder


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=c` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}{_yaml_where(e)}: invalid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    cfg = _build(Config, apply_overrides(raw, overrides), "")
    from wdl.config_checks import validate  # the checks read this module's classes

    validate(cfg)
    return cfg


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem:
        return f"{context}, {problem}" if context else problem
    return str(e).splitlines()[0]


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`raw`, a config file's mapping, with each `a.b=c` applied (in place) as load_config applies it."""
    for item in overrides:
        _apply_override(raw, item)
    return raw


def key_type(key: str) -> Any:
    """The type of the value at the dotted `key` of the config tree, or None where there is no such place."""
    tp: Any = Config
    for part in key.split("."):
        tp = _child_type(tp, part) if part else None
        if tp is None:
            return None
    return tp


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node, tp = raw, Config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node, tp = child, _child_type(tp, part)
    last = parts[-1]
    node[last] = _merge(_child_type(tp, last), node.get(last), parsed)


def _merge(tp: Any, old: Any, new: Any) -> Any:
    """`new` over `old` (raw YAML values at a place of type `tp`): a mapping given for a section
    (a dataclass) changes only the keys it names; any other value replaces the old one."""
    if not (dataclasses.is_dataclass(tp) and isinstance(old, dict) and isinstance(new, dict)):
        return new
    # Keys that exclude each other (a column's id source): naming one drops the others old gave.
    one_of = getattr(tp, "ONE_OF", ())
    if any(k in new for k in one_of):
        old = {k: v for k, v in old.items() if k not in one_of}
    return {**old, **{k: _merge(_child_type(tp, k), old.get(k), v) for k, v in new.items()}}


def _child_type(tp: Any, key: str) -> Any:
    """The type of `key` inside a value of type `tp` (a section's field, a mapping's entry), or
    None where there is none: the key is then unknown, which _build reports."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp).get(key)
    if typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1]
    return None


def _build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """A `cls` from the keys `raw` names over `base` (default: `cls()`): a section given in part
    keeps its other values, and a nested section's defaults are those of its parent's default
    (optim.wide's are FTRL's, not OptimizerConfig's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {_join(where, key)!r} (known here: {known})")
    base = cls() if base is None else base
    changes = {k: _convert(hints[k], v, _join(where, k), getattr(base, k)) for k, v in raw.items()}
    return dataclasses.replace(base, **changes)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    """`value` (raw YAML) checked and converted to `tp`; `base` is what a section given in part
    keeps (the parent's default at this place)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where, base if isinstance(base, tp) else None)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not valid ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {where}")  # a bug in this module, not user input


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
