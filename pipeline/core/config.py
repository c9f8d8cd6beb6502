"""Typed, frozen, validated parameters: `params.yaml` plus `-S key=value` overrides.

The defaults below are the defaults: `params.yaml` spells out every key with exactly these
values (tests/test_config.py fails when the two differ), so `Config()`, the CLI and `dvc repro`
train the same model.

Every section of `params.yaml` maps to one frozen dataclass. Each field carries its own check
(`allowed`), so a bad value is reported as one line naming the dotted key and what is allowed,
before any work starts. Stages exit with code 2 on such an error (see `pipeline.cli`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from pipeline.core.errors import ConfigError

PARAMS_FILE = Path("params.yaml")  # relative to the repository root


# --- field checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A predicate on a value plus the words that say what is allowed."""

    ok: Callable[[Any], bool]
    allowed: str


def one_of(*choices: Any) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return Check(ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def power_of_two(low: int, high: int) -> Check:
    return Check(
        lambda v: low <= v <= high and v & (v - 1) == 0,
        f"a power of two from {low} to {high}",
    )


def param(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A dataclass field with a default, an optional check and a one-line description."""
    return field(default=default, metadata={"check": check, "doc": doc})


# --- sections -----------------------------------------------------------------------------------


# train.augment_ops: the ops of pipeline.train.augment (core may not import train).
AUGMENT_OPS = ("translation", "cutout", "color", "flip", "rot90")


def _augment_ops_ok(spec: str) -> bool:
    names = [name.strip() for name in spec.split(",")]
    return spec == "auto" or (bool(names) and all(name in AUGMENT_OPS for name in names))


BUILTIN_SOURCE = "mnist5k"  # the dataset that ships with the product (5,000 MNIST digits)


@dataclass(frozen=True)
class DataConfig:
    """`data`: where images come from and how they are sharded."""

    source: str = param(
        BUILTIN_SOURCE,
        doc="mnist5k, a directory of images, a .zip/.tar/.tar.gz, or a .parquet/.csv manifest "
        "(column path or url, optional label; paths may be fsspec URLs)",
    )
    image_size: int = param(32, power_of_two(16, 128), "side of the square images, px")
    channels: int = param(1, one_of(1, 3), "1 = grayscale, 3 = RGB")
    val_fraction: float = param(0.1, between(0.0, 1.0, high_open=True), "held-out share")
    seed: int = param(0, at_least(0), "seed of the train/val split")
    samples_per_shard: int = param(1000, at_least(1), "max samples in one tar shard")
    on_bad_image: str = param("skip", one_of("skip", "error"), "skip (count) or error (stop)")
    min_side_px: int = param(8, at_least(1), "images with a smaller side are skipped")
    num_processes: int = param(
        0, at_least(0), "decode processes of the local backend; 0 = one per CPU core"
    )
    backend: str = param(
        "auto", one_of("auto", "local", "ray"),
        "where shards are written: local = processes here, ray = one Ray task per shard; "
        "auto = ray when RAY_ADDRESS is set or inside a Ray job, else local",
    )
    shards_dir: str = param(
        "data/shards", doc="where shards go: a path (relative to the repo) or fsspec URL that "
        "every Ray node reaches",
    )


@dataclass(frozen=True)
class ModelConfig:
    """`model`: DCGAN widths."""

    nz: int = param(100, at_least(1), "length of the latent vector z")
    ngf: int = param(32, at_least(1), "generator width (channels of its last hidden layer)")
    ndf: int = param(32, at_least(1), "discriminator width (channels of its first layer)")


@dataclass(frozen=True)
class TrainConfig:
    """`train`: Ray Train DDP training."""

    num_workers: int = param(
        0, at_least(0), "Ray Train workers (DDP ranks); 0 = auto: one per GPU, else per node"
    )
    use_gpu: bool = param(False, doc="one GPU per worker, NCCL; else CPU and gloo")
    cpus_per_worker: int = param(
        0, at_least(0), "CPUs (torch threads) per worker; 0 = auto: its node's share"
    )
    batch_size: int = param(64, at_least(1), "images per worker per step")
    epochs: int = param(80, at_least(1), "passes over the train split (global batch)")
    lr_g: float = param(2e-3, between(0.0, 1.0, low_open=True), "Adam lr of the generator")
    lr_d: float = param(2e-3, between(0.0, 1.0, low_open=True), "Adam lr of the discriminator")
    beta1: float = param(0.5, between(0.0, 1.0, high_open=True), "Adam beta1")
    beta2: float = param(0.99, between(0.0, 1.0, high_open=True), "Adam beta2")
    precision: str = param("fp32", one_of("fp32", "bf16"), "autocast precision")
    ema_half_life_images: int = param(
        10_000, at_least(0), "half-life of the generator's weight average (images); 0 = off"
    )
    r1_gamma: float = param(
        0.1, between(0.0, 1000.0),
        "weight of the R1 penalty gamma/2 E||grad D(real)||^2 (lazy, see r1_every_steps); 0 = off",
    )
    r1_every_steps: int = param(16, at_least(1), "steps between R1 updates of D (lazy)")
    eval_every_images: int = param(
        18_000, at_least(0), "images between in-training quality checks; 0 = every epoch"
    )
    augment: str = param(
        "off", one_of("off", "fixed", "adaptive"),
        "augment what D sees (reals and fakes): fixed = DiffAugment, adaptive = ADA's p",
    )
    augment_ops: str = param(
        "auto", Check(_augment_ops_ok, "auto or a comma list of " + ", ".join(AUGMENT_OPS)),
        "auto = translation,cutout (+color for RGB); flip and rot90 only where they keep "
        "the meaning (faces: flip)",
    )
    augment_p: float = param(1.0, between(0.0, 1.0), "probability of each op (augment=fixed)")
    ada_target: float = param(
        0.6, between(0.0, 1.0, high_open=True), "target of r_t = E[sign(D(real))] (adaptive)"
    )
    ada_speed_images: int = param(
        100_000, at_least(1), "images over which p can move from 0 to 1 (adaptive)"
    )
    ada_every_steps: int = param(4, at_least(1), "steps between adjustments of p (adaptive)")
    sync_batchnorm: bool = param(True, doc="batch statistics of the global batch")
    cpu_allreduce: str = param(
        "auto", one_of("auto", "gloo"),
        "CPU ranks: auto = shared memory among ranks on one x86 machine, else gloo; gloo = "
        "always gloo",
    )
    gradient_allreduce: str = param(
        "auto", one_of("auto", "ddp", "bucketed"),
        "ranks > 1: ddp = DDP (overlaps the backward); bucketed = one flat all-reduce per model "
        "after its backward, inside the CUDA graph; auto = bucketed where the step is captured",
    )
    checkpoint_every_steps: int = param(200, at_least(1), "steps between checkpoints")
    log_every_steps: int = param(10, at_least(1), "steps between logged metrics")
    max_failures: int = param(2, at_least(0), "worker-group restarts Ray attempts")
    data_cache: str = param(
        "auto", one_of("auto", "device", "host", "stream"),
        "where each worker keeps the decoded train split; auto = device, else host, else stream",
    )
    loader_workers: int = param(1, at_least(0), "DataLoader processes per worker (stream only)")
    compile: str = param(
        "auto", one_of("auto", "off"),
        "auto = the D+G step as one CUDA graph on a GPU (else eager, reason logged); off = eager",
    )
    seed: int = param(0, at_least(0), "seed of weights, noise and shuffling")
    storage_path: str = param("", doc="Ray checkpoint storage; '' = .ray_storage in the repo")
    resume: str = param(
        "auto", one_of("auto", "never"),
        "auto = continue an interrupted run of the same config, data and code from its last "
        "checkpoint; never = always a fresh run",
    )
    shards: str = param("", doc="shard directory or fsspec URL; '' = data/shards")


@dataclass(frozen=True)
class ClassifierConfig:
    """`classifier`: the domain classifier used as FID feature extractor."""

    epochs: int = param(16, at_least(1), "passes over the labelled train split")
    batch_size: int = param(64, at_least(1), "images per step")
    lr: float = param(4e-3, between(0.0, 1.0, low_open=True), "peak Adam lr (one-cycle)")
    seed: int = param(0, at_least(0), "seed of weights and shuffling")
    min_val_accuracy: float = param(0.98, between(0.0, 1.0), "the bar of a trusted extractor")
    on_below_min: str = param(
        "auto", one_of("auto", "error", "weak"),
        "below the bar: error, or go on with FIDs marked weak; auto = error on mnist5k",
    )


@dataclass(frozen=True)
class EvalConfig:
    """`eval`: FID/KID, grids and the mode-collapse alarm."""

    num_samples: int = param(500, at_least(2), "generated (and real) images per FID/KID")
    batch_size: int = param(250, at_least(1), "images per generator/extractor batch")
    feature_extractor: str = param(
        "auto", one_of("auto", "inception", "classifier"),
        "FID features; auto = Inception if its weights file is found, else classifier",
    )
    inception_weights: str = param("", doc="path of the FID Inception weights file")
    kid_subset_size: int = param(100, at_least(2), "images per KID subset")
    seed: int = param(0, at_least(0), "seed of the evaluation noise")
    collapse_min_coverage: float = param(0.8, between(0.0, 1.0), "classes-hit share alarm")


@dataclass(frozen=True)
class MlflowConfig:
    """`mlflow`: where runs and models are tracked."""

    tracking_uri: str = param("sqlite:///mlflow.db", doc="sqlite:///file.db or http://host:port")
    experiment: str = param("dcgan", doc="MLflow experiment name")


@dataclass(frozen=True)
class RegisterConfig:
    """`register`: MLflow model registry."""

    model_name: str = param("dcgan-generator", doc="registered model name")
    alias: str = param("candidate", doc="alias set on each newly registered version")


@dataclass(frozen=True)
class Config:
    """All of `params.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


# --- loading ------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)=(.*)$", re.DOTALL)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `section.key=value` override; the value is read as YAML, as `dvc exp run -S`."""
    match = _OVERRIDE.match(text)
    if not match:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = match.groups()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted off/on (also no/yes, false/true) as a bool, and so do
            # `-S key=off` and DVC: a string parameter takes it as the word off/on.
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported parameter type {kind}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            section = values.get(f.name) or {}
            if not isinstance(section, Mapping):
                raise ConfigError(f"{key}: expected a mapping of keys, got {section!r}")
            kwargs[f.name] = _build(kind, section, key + ".")
            continue
        if f.name not in values:
            continue
        value = _coerce(key, values[f.name], kind)
        check: Check | None = f.metadata.get("check")
        if check is not None and not check.ok(value):
            raise ConfigError(f"{key}: must be {check.allowed}, got {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        node = child
    node[leaf] = value


def load_config(
    params_path: str | Path = PARAMS_FILE, overrides: Sequence[str] = ()
) -> Config:
    """Load `params_path`, apply `section.key=value` overrides, validate everything.

    Raises `ConfigError` (one line naming the key) on an unknown key, a wrong type or a value
    out of range.
    """
    path = Path(params_path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    return config_from_text(path.read_text(), str(path), overrides)


def config_from_text(text: str, source: str = "params", overrides: Sequence[str] = ()) -> Config:
    """`load_config` for the YAML text of a params file (`source` names it in errors), e.g.
    the params.yaml of a commit."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err.__class__.__name__})") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections")
    for override in overrides:
        _set_dotted(tree, *parse_override(override))
    return _build(Config, tree, "")


def to_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config (or a section) to dotted keys, e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, f"{prefix}{f.name}."))
        else:
            flat[prefix + f.name] = value
    return flat


def changed_keys(config: Config, baseline: Config) -> dict[str, Any]:
    """The dotted keys whose value in `config` differs from `baseline`, with `config`'s value."""
    before = to_flat_dict(baseline)
    return {key: value for key, value in to_flat_dict(config).items() if before[key] != value}


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a (validated) config dataclass from `dataclasses.asdict` output."""
    return _build(cls, values, "")


def describe(cls: type = Config, prefix: str = "") -> Iterable[tuple[str, Any, str, str]]:
    """Yield (dotted key, default, allowed, doc) for every parameter: the params reference."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from describe(kind, f"{prefix}{f.name}.")
            continue
        check: Check | None = f.metadata.get("check")
        allowed = check.allowed if check else kind.__name__
        yield prefix + f.name, f.default, allowed, f.metadata.get("doc", "")


def parameter_types(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Dotted key -> Python type (bool, int, float or str) of every parameter."""
    hints = get_type_hints(cls)
    types: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            types.update(parameter_types(kind, f"{prefix}{f.name}."))
        else:
            types[prefix + f.name] = kind
    return types


def from_logged_text(key: str, text: str) -> Any:
    """The value of `key` from its text as MLflow logged it (`str(value)`); ConfigError when
    the key is unknown or the text is not of its type."""
    kind = parameter_types().get(key)
    if kind is None:
        raise ConfigError(f"{key}: unknown key")
    try:
        if kind is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a {kind.__name__}") from None


def _yaml_float(value: float) -> str:
    """`value` as YAML text that PyYAML also reads as a float: `1e-05` is a string to YAML 1.1
    (it wants a dot in the mantissa), `1.0e-05` is not."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def set_params(params_path: str | Path, values: Mapping[str, Any]) -> Config:
    """Set dotted keys in a params file, keeping its comments, order and quoting (what
    `dvc exp run -S` does to params.yaml); returns the file's validated config afterwards."""
    from ruamel.yaml import YAML

    rt = YAML()  # round trip
    rt.preserve_quotes = True
    rt.representer.add_representer(
        float, lambda rep, v: rep.represent_scalar("tag:yaml.org,2002:float", _yaml_float(v))
    )
    path = Path(params_path)
    tree = rt.load(path)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    rt.dump(tree, path)
    return load_config(path)
