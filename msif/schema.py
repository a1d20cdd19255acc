"""The schema of every composed config: structured dataclasses that `check_config` merges the resolved config into.

Hydra composes conf/ freely (and `+key=value` adds any key), so a typo such as `+train.pretrain.stpes=10` would
otherwise train the default steps without a word. Merging into these dataclasses refuses, before any work starts
and with the full key named: keys the schema does not have, values of the wrong type, and (from each field's
metadata) values out of range or not among the choices. The IHVP solver groups are checked by the library's own
typed settings (msif.influence.settings). Model factories take free-form arguments (the embedding/head contract of
msif.models), so `model.embedding` and `model.head` are checked when the network is built.
"""

import importlib
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any  # noqa: UP035  (OmegaConf reads these annotations)

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from msif.errors import MsifError


def at_least(low: float, default: Any = MISSING, **kw: Any) -> Any:
    return field(default=default, metadata={"min": low}, **kw)


def above(low: float, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"above": low})


def one_of(*choices: Any, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class Upstream:
    auto: bool = True
    pretrain: str | None = None
    finetune: str | None = None


@dataclass
class Weights:
    pretrain: str | None = None
    finetune: str | None = None
    rename: dict[str, str] | None = None


@dataclass
class Normalize:
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class Generator:
    dim: int = at_least(1, 10)
    n_classes: int = at_least(2, 6)
    train_per_class: int = at_least(1, 60)
    test_per_class: int = at_least(1, 30)
    spread: float = above(0.0, 1.0)
    seed: int = 0


@dataclass
class LabelNoise:
    fraction: float = at_least(0.0, 0.05)
    seed: int = 0


@dataclass
class PretrainData:
    source: Any = None  # this stage's own source (msif.data.sources.source_spec checks it); null = dataset.source
    classes: list[Any] | None = None  # null = every class of the source
    n_train: int | None = at_least(1, None)
    label_noise: LabelNoise | None = None  # planted faults (msif planted-faults); absent from the shipped configs


@dataclass
class FinetuneData:
    source: Any = None
    classes: list[Any] | None = None
    n_train: int | None = at_least(1, None)
    n_test: int | None = at_least(1, None)
    subsample_seed: int = 0


@dataclass
class InfluenceDefaults:
    pretrain_damping: float = at_least(0.0, 0.01)
    finetune_damping: float = at_least(0.0, 1e-8)
    hessian_sample: int | None = at_least(1, 1000)


@dataclass
class TextOptions:
    vocab_size: int = at_least(5, 10000)  # tokens, the 4 special ones included
    max_len: int = at_least(1, 32)  # words kept per sentence (then </s>); longer sentences are cut
    bidirectional: bool = False  # the language model predicts the next and the previous token (ELMo's two losses)


@dataclass
class Dataset:
    name: str = ""
    source: Any = ""  # a built-in name or a mapping with a kind (msif.data.sources)
    root: str | None = None
    download: bool = False
    normalize: Normalize | None = None
    generator: Generator | None = None
    pretrain: PretrainData = field(default_factory=PretrainData)
    finetune: FinetuneData = field(default_factory=FinetuneData)
    influence: InfluenceDefaults = field(default_factory=InfluenceDefaults)
    text: TextOptions | None = None  # text sources: the vocabulary and sentence length


@dataclass
class Model:
    name: str = ""
    embedding: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] | None = field(default_factory=dict)  # null when each stage names its own
    pretrain_head: dict[str, Any] | None = None  # a head per stage (text: the language model's output layer)
    finetune_head: dict[str, Any] | None = None


@dataclass
class Recipe:
    optimizer: str = one_of("adam", "sgd", default="adam")
    lr: float = above(0.0, 1e-3)
    weight_decay: float = at_least(0.0, 0.0)
    batch_size: int = at_least(1, 128)
    steps: int = at_least(1, 100)


@dataclass
class FinetuneRecipe(Recipe):
    standardize: bool = False  # fix the head's input map to the training features' mean and spread (text heads)


@dataclass
class Train:
    name: str = ""
    pretrain: Recipe = field(default_factory=Recipe)
    finetune: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    eval_batch_size: int = at_least(1, 2048)


@dataclass
class Case:
    name: str = one_of("fixed", "updated", default="fixed")
    alpha: float = at_least(0.0, 0.01)
    proximal: bool = False


@dataclass
class StepCounts:
    fixed: int = at_least(1, 100)
    updated: int = at_least(1, 100)


@dataclass
class Steps:
    pretrain: int = at_least(1, 100)
    finetune: StepCounts = field(default_factory=StepCounts)


@dataclass
class LooSteps(Steps):
    pretrain_epochs: int | None = at_least(1, None)  # set: K_p is this many whole passes (equal exposure)
    lr: float | None = above(0.0, None)  # the retrains' learning rate


@dataclass
class Budget:
    cg_iterations: int = at_least(1, 50)
    lanczos_steps: int = at_least(1, 100)
    pretrain_hessian_sample: dict[str, Any] = field(default_factory=dict)  # per data set: an int >= 1 or null
    finetune_hessian_sample: dict[str, Any] = field(default_factory=dict)  # per data set and case: int >= 1 or null


@dataclass
class RelativeDamping:
    pretrain: float | None = above(0.0, None)
    finetune: float | None = above(0.0, None)


@dataclass
class Profile:
    name: str = ""
    train: dict[str, Steps] = field(default_factory=dict)
    loo: dict[str, LooSteps] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    relative_damping: RelativeDamping = field(default_factory=RelativeDamping)
    response: str = one_of("inverse", "retrain", default="inverse")


@dataclass
class Base:
    """Settings every stage has (conf/msif.yaml and its groups)."""

    seed: int = 0
    device: str = "auto"
    dtype: str = one_of("float32", "float64", default="float32")
    data_root: str | None = None
    cache_dir: str | None = None
    output_root: str = "outputs"
    force: bool = False
    upstream: Upstream = field(default_factory=Upstream)
    weights: Weights = field(default_factory=Weights)
    dataset: Dataset = field(default_factory=Dataset)
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    case: Case = field(default_factory=Case)
    profile: Profile = field(default_factory=Profile)


@dataclass
class Target:
    kind: str = one_of("test_set", "indices", "misclassified", default="test_set")
    indices: list[int] | None = None
    per_test: bool = False
    max_points: int | None = at_least(1, None)
    chunk: int = at_least(1, 32)


@dataclass
class Score:
    indices: list[int] | None = None
    sample: int | None = at_least(1, None)  # score a seeded random sample of this many rows instead of all
    seed: int = 0
    method: str = one_of("auto", "jvp", "per_example", default="auto")
    part_rows: int = at_least(1, 8192)


@dataclass
class HessianSample:
    pretrain_sample: int | None = at_least(1, 1000)
    finetune_sample: int | None = at_least(1, None)
    seed: int = 0
    batch_size: int = at_least(1, 100)
    graph_budget_gib: float | None = at_least(0.0, 6.0)


@dataclass
class Output:
    csv: bool = False
    top_k: int = at_least(1, 10)
    plots: bool = True


@dataclass
class Checks:
    stability: bool = False
    top: int = at_least(1, 100)


@dataclass
class Response:
    kind: str = one_of("inverse", "retrain", default="inverse")
    lr: float | None = above(0.0, None)
    pretrain_steps: int | None = at_least(0, None)  # as loo.*, which validate-loo passes on
    pretrain_epochs: int | None = at_least(1, None)
    finetune_steps: int = at_least(0, 100)


@dataclass
class Influence(Base):
    """conf/influence.yaml."""

    mode: str = one_of("multi_stage", "single_stage", default="multi_stage")
    solver: dict[str, Any] = field(default_factory=dict)  # checked by msif.influence.settings (msif.config)
    embedding_params: list[str] | None = None  # globs of the embedding parameters to track (the rest held fixed)
    target: Target = field(default_factory=Target)
    score: Score = field(default_factory=Score)
    hessian: HessianSample = field(default_factory=HessianSample)
    response: Response = field(default_factory=Response)
    output: Output = field(default_factory=Output)
    check: Checks = field(default_factory=Checks)


@dataclass
class Loo:
    k: int = at_least(1, 50)
    selection: str = one_of("mix", "top", "random", default="mix")
    indices: list[int] | None = None
    seed: int = 0
    pretrain_steps: int | None = at_least(0, None)
    pretrain_epochs: int | None = at_least(1, None)
    finetune_steps: int = at_least(0, 100)
    removal: str = one_of("zero_weight", "drop", default="zero_weight")
    repeats: int = at_least(1, 2)
    optimizer: str | None = one_of("sgd", "adam", None, default="sgd")
    lr: float | None = above(0.0, 0.05)
    finetune_start: str = one_of("shifted", "pretrained", default="shifted")
    reference: str = one_of("retrain", "original", default="retrain")
    compare: str | None = None
    workers: int = at_least(1, 1)
    threads: int | None = at_least(1, None)
    bootstrap: int = at_least(0, 2000)


@dataclass
class ValidateLoo(Influence):
    """conf/validate_loo.yaml."""

    loo: Loo = field(default_factory=Loo)


@dataclass
class LdsSettings:
    subsets: int = at_least(3, 100)
    alpha: float = above(0.0, 0.5)
    seed: int = 0
    baselines: list[str] | None = None
    workers: int = at_least(1, 1)
    threads: int | None = at_least(1, None)
    bootstrap: int = at_least(0, 2000)


@dataclass
class ValidateLds(ValidateLoo):
    """conf/validate_lds.yaml."""

    lds: LdsSettings = field(default_factory=LdsSettings)


@dataclass
class CleanseSettings:
    fraction: float = above(0.0, 0.1)
    seeds: Any = field(default_factory=lambda: [0, 1, 2])  # a list of distinct integers (checked by the stage)
    start: str = one_of("scratch", "warm", default="scratch")
    warm_steps: int = at_least(1, 100)
    random_seed: int = 0
    grid: int = at_least(1, 16)
    workers: int = at_least(1, 1)
    threads: int | None = at_least(1, None)


@dataclass
class CleanseLoo:
    pretrain_steps: int = at_least(0, 100)


@dataclass
class Cleanse(Influence):
    """conf/cleanse.yaml."""

    cleanse: CleanseSettings = field(default_factory=CleanseSettings)
    loo: CleanseLoo = field(default_factory=CleanseLoo)


@dataclass
class Faults:
    fraction: float = above(0.0, 0.05)
    seed: int = 0
    inspect: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    cleanse: bool = True


@dataclass
class PlantedFaults(Cleanse):
    """conf/planted_faults.yaml."""

    faults: Faults = field(default_factory=Faults)


@dataclass
class Reproduce(Base):
    """conf/reproduce.yaml (the plan itself is checked by msif.stages.reproduce)."""

    plan: dict[str, Any] = field(default_factory=dict)
    report_dir: str = "outputs/reproduce"
    only: list[str] | None = None


def schema_for(cfg: DictConfig) -> type:
    """The schema of a composed config, told by the sections it has (a stage may run on a downstream stage's
    config: `msif cleanse` runs influence with the cleanse config)."""
    if "plan" in cfg:
        return Reproduce
    if "faults" in cfg:
        return PlantedFaults
    if "lds" in cfg:
        return ValidateLds
    if "cleanse" in cfg:
        return Cleanse
    if "loo" in cfg:
        return ValidateLoo
    if "target" in cfg:
        return Influence
    return Base


def check_config(cfg: DictConfig) -> None:
    """Refuse unknown keys, wrong types and out-of-range values of the composed `cfg`, naming the key."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise MsifError(
            f"The configuration does not resolve: {' '.join(str(err).split())}",
            "Check the overrides on the command line (print the composed config with --cfg job).",
        ) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MsifError(
            f"The setting(s) {', '.join(missing)} must be given (the config leaves them as ???).",
            "For your own data, set dataset.source (or dataset.pretrain.source and dataset.finetune.source) in your "
            "experiment config; README, 'Your own data', shows one."
            if any(k.startswith("dataset.") for k in missing)
            else "Set them on the command line or in your config.",
        )
    schema = schema_for(cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        text = str(err).splitlines()[0]
        raise MsifError(
            f"The setting '{key}' is not valid: {text}.",
            "Check its spelling and value against the composed config (`msif <stage> --cfg job` prints it); "
            "a key added with + must be one msif reads.",
        ) from None
    _check_ranges(merged, schema, "")
    _check_directions(plain)
    _check_standardize(plain)


def _check_standardize(plain: dict) -> None:
    """train.finetune.standardize needs a finetune head that has an input map to fix (PooledHead's `standardize`)."""
    if not ((plain.get("train") or {}).get("finetune") or {}).get("standardize"):
        return
    model = plain.get("model") or {}
    head = model.get("finetune_head") or model.get("head") or {}
    target = str(head.get("_target_", ""))
    module, _, name = target.rpartition(".")
    try:
        found = hasattr(getattr(importlib.import_module(module), name), "standardize")
    except (ImportError, AttributeError, ValueError):
        found = True  # an unimportable head is reported where the network is built, with its own paragraph
    if not found:
        raise MsifError(
            f"train.finetune.standardize=true fixes the finetune head's input map, but model={model.get('name')}'s "
            f"head {target} has none (no `standardize` method).",
            "Set train.finetune.standardize=false, or use a head that standardizes its input (msif.models.PooledHead).",
        )


def _check_directions(plain: dict) -> None:
    """The language model's targets and its output layer must agree on the directions: a bidirectional data set's
    targets hold the next and the previous token, a bidirectional head predicts both."""
    text = (plain.get("dataset") or {}).get("text") or {}
    model = plain.get("model") or {}
    head = model.get("pretrain_head") or {}
    if text.get("bidirectional") and not head.get("bidirectional"):
        raise MsifError(
            f"dataset.text.bidirectional=true asks for the next and the previous token, but model={model.get('name')} "
            "predicts only the next one (its pretrain head has no bidirectional: true).",
            "Use model=text_lstm (its LSTM reads both ways when the data set asks), or set "
            "dataset.text.bidirectional=false.",
        )
    if head.get("bidirectional") and not text.get("bidirectional"):
        raise MsifError(
            f"model={model.get('name')} predicts the next and the previous token, but the data set's targets are the "
            "next token only (dataset.text.bidirectional is false).",
            "Set dataset.text.bidirectional=true, and leave model.embedding.bidirectional to follow it.",
        )


def _check_ranges(node: Any, schema: type, prefix: str) -> None:
    for f in fields(schema):
        value = node[f.name] if f.name in node else None
        key = f"{prefix}{f.name}"
        nested = _dataclass_of(f.type)
        if nested is not None:
            if value is not None:
                _check_ranges(value, nested, f"{key}.")
            continue
        meta = f.metadata
        if value is None or not meta:
            continue
        if "choices" in meta and value not in meta["choices"]:
            choices = ", ".join(str(c) for c in meta["choices"] if c is not None)
            raise MsifError(f"{key}={value} is not one of its options.", f"Use {key}= one of: {choices}.")
        if "min" in meta and not (_finite(value) and value >= meta["min"]):
            raise MsifError(f"{key} must be >= {meta['min']:g}, got {value!r}.", f"Set e.g. {key}={f.default}.")
        if "above" in meta and not (_finite(value) and value > meta["above"]):
            raise MsifError(f"{key} must be > {meta['above']:g}, got {value!r}.", f"Set e.g. {key}={f.default}.")


def _dataclass_of(t: Any) -> type | None:
    """The dataclass a field holds (also inside Optional[...]), or None."""
    if is_dataclass(t):
        return t
    for arg in typing.get_args(t):
        if is_dataclass(arg):
            return arg
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
