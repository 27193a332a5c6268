"""Training configuration: typed defaults, then a YAML file, then `dotted.key=value` overrides.

The dataclasses below are the schema. One generic converter, driven by their type hints and by the
`choices`/`min`/`max` rules in field metadata, checks every value as it is read, so a typo or a wrong type
fails at start-up with a message naming the key and where it came from, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.atomic_io import write_text_atomically
from train.augment import AUGMENT_POLICIES
from train.detectors import FIXED_SIZE_MODELS
from train.precision import AMP_DTYPES
from train.strategy import DEVICES, STRATEGY_KINDS
from train.wandb_run import WANDB_MODES

COMMAND_LINE = "command line"
# Options that another option now sets: (that option, why), for a clear error instead of "unknown key".
MOVED_KEYS = {
    "model.builder_kwargs.box_detections_per_img":
        ("eval.max_detections", "one cap for the model's detections per image and COCOeval's maxDets"),
}


def _rule(default: Any, **rules: Any) -> Any:
    """A field whose value must satisfy `choices`, `min` and/or `max` (inclusive)."""
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    manifest: str = "data/synth/shards/manifest.json"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    batch_size: int = _rule(2, min=1)  # images per device per step (dp loads batch_size * num_gpus)
    num_workers: int = _rule(2, min=0)
    shuffle_buffer: int = _rule(64, min=0)
    hflip_prob: float = _rule(0.5, min=0.0, max=1.0)  # the flip, under every augment policy
    aspect_ratio_grouping: bool = True  # batch landscape with landscape, portrait with portrait (less padding)
    # Training images' scale (train/augment.py): hflip = the flip alone, the model resizes to model.min_size/max_size;
    # multiscale and lsj size images in the reader, and the model then resizes in evaluation only.
    augment: str = _rule("hflip", choices=AUGMENT_POLICIES)
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))  # multiscale: shorter sides
    max_size: int = _rule(1333, min=1)  # multiscale: the longer side's cap
    jitter_range: list[float] = field(default_factory=lambda: [0.1, 2.0])  # lsj: scale factors, low and high
    crop_size: int = _rule(1024, min=1)  # lsj: the square every training image is cut or padded to
    # Before the first step every shard's size is checked against the manifest; this also checks its sha256 and
    # sample count (reads every byte, shared out over the ranks): catches damage that keeps the size.
    verify_checksums: bool = False

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be a non-empty list of sizes >= 1, got {self.scales}")
        if len(self.jitter_range) != 2 or not 0 < self.jitter_range[0] <= self.jitter_range[1]:
            raise ValueError(f"jitter_range must be [low, high] with 0 < low <= high, got {self.jitter_range}")


@dataclass
class BuilderKwargs:
    """Keyword arguments for the torchvision detector builder; None keeps the builder's own default.

    Most apply to the Faster R-CNN family only (train/model.py rejects one the chosen model does not take).
    The cap on detections per image is not one of them: eval.max_detections sets it for every model.
    `representation_size` (the width of Faster R-CNN's two-layer box head, torchvision: 1024) and `anchor_sizes`
    are not arguments of every builder (the MobileNet ones fix their anchors): train/model.py replaces the head
    or the anchor generator after the build instead.
    """

    rpn_pre_nms_top_n_train: int | None = _rule(None, min=1)
    rpn_post_nms_top_n_train: int | None = _rule(None, min=1)
    rpn_pre_nms_top_n_test: int | None = _rule(None, min=1)
    rpn_post_nms_top_n_test: int | None = _rule(None, min=1)
    rpn_batch_size_per_image: int | None = _rule(None, min=1)  # anchors sampled per image for the RPN loss
    rpn_score_thresh: float | None = _rule(None, min=0.0, max=1.0)
    box_batch_size_per_image: int | None = _rule(None, min=1)  # proposals sampled per image for the box head
    box_positive_fraction: float | None = _rule(None, min=0.0, max=1.0)
    box_score_thresh: float | None = _rule(None, min=0.0, max=1.0)
    box_nms_thresh: float | None = _rule(None, min=0.0, max=1.0)
    representation_size: int | None = _rule(None, min=1)
    # The RPN's (or RetinaNet's, FCOS's) anchor sizes in input pixels, one list per feature map from the finest,
    # each as long as the builder's (its aspect ratios and head stay): fit them to the objects. None = builder's.
    anchor_sizes: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.anchor_sizes is not None and (
                not self.anchor_sizes or any(not sizes or min(sizes) < 1 for sizes in self.anchor_sizes)):
            raise ValueError(f"anchor_sizes must be non-empty lists of sizes >= 1, got {self.anchor_sizes}")

    def given(self) -> dict[str, int | float | list[list[int]]]:
        """The arguments that were set, by name."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class ModelConfig:
    name: str = "fasterrcnn_resnet50_fpn"
    # What the model starts from (train/weights.py): a torchvision weights name for this model (DEFAULT,
    # COCO_V1, FasterRCNN_ResNet50_FPN_Weights.COCO_V1), fetched through torch.hub's cache, or a local file (a
    # torchvision state dict or one of our checkpoints); None = random initialisation.
    weights: str | None = None
    # Or only the backbone from ImageNet: a torchvision name for the model's backbone (DEFAULT, IMAGENET1K_V1)
    # or a local classification state dict. Faster R-CNN, RetinaNet and FCOS; not with `weights`.
    weights_backbone: str | None = None
    min_size: int = _rule(800, min=1)
    max_size: int = _rule(1333, min=1)
    frozen_batchnorm: bool = True  # the backbone's BatchNorm2d become FrozenBatchNorm2d (statistics kept)
    # Their eps; None = as the starting weights were made: each BatchNorm2d's own, but 0 for torchvision's
    # COCO_V1 files of fasterrcnn_resnet50_fpn and retinanet_resnet50_fpn (as its builders load them).
    frozen_batchnorm_eps: float | None = _rule(None, min=0.0)
    builder_kwargs: BuilderKwargs = field(default_factory=BuilderKwargs)


@dataclass
class OptimConfig:
    name: str = _rule("sgd", choices=("sgd", "adamw"))
    lr: float = _rule(0.02, min=0.0)
    reference_batch_size: int | None = _rule(None, min=1)  # lr is scaled by global_batch / this when set
    momentum: float = _rule(0.9, min=0.0, max=1.0)
    weight_decay: float = _rule(1e-4, min=0.0)
    schedule: str = _rule("multistep", choices=("multistep", "cosine", "constant"))
    milestones: list[int] = field(default_factory=lambda: [16, 22])  # epochs, for multistep
    gamma: float = _rule(0.1, min=0.0)
    warmup_steps: int = _rule(100, min=0)
    warmup_factor: float = _rule(0.001, min=0.0, max=1.0)
    clip_grad_norm: float | None = _rule(None, min=0.0)
    accumulate_steps: int = _rule(1, min=1)

    def __post_init__(self) -> None:
        if any(self.milestones[i] >= self.milestones[i + 1] for i in range(len(self.milestones) - 1)):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")


@dataclass
class TrainConfig:
    epochs: int = _rule(1, min=1)
    max_steps: int | None = _rule(None, min=0)  # stop after this many optimizer steps in total (0: build, save)
    amp: str = _rule("off", choices=tuple(AMP_DTYPES))
    max_nonfinite_steps: int = _rule(5, min=1)  # stop after this many non-finite losses in a row
    log_every: int = _rule(10, min=1)
    throughput_warmup_steps: int = _rule(2, min=0)  # steps excluded from images/s
    channels_last: bool = False  # NHWC weights and activations for the convolutions (tensor cores on GPUs)
    cudnn_benchmark: bool = False  # autotune convolutions per input shape: pays only when shapes repeat
    compile_backbone: bool = False  # torch.compile the backbone in place (state_dict keys unchanged)
    # An exponential moving average of the weights (train/ema.py), evaluated and saved as the model; None = off.
    # Its decay warms up as ema_decay * (1 - exp(-optimizer steps / ema_tau)) (Ultralytics); ema_tau 0: no warm-up.
    ema_decay: float | None = _rule(None, min=0.0, max=1.0)
    ema_tau: float = _rule(2000.0, min=0.0)
    # Early stopping: stop after `patience` validations in a row without an AP gain of more than min_delta over
    # the last gain; None or 0 = off. It needs validation (eval.every_epochs).
    patience: int | None = _rule(None, min=0)
    min_delta: float = _rule(0.0, min=0.0)


@dataclass(kw_only=True)
class FreezePhase:
    """From its start on (epoch or optimizer step, both counted from 0), a parameter trains iff its name
    matches a `train` prefix and no `frozen` prefix (see train/freezing.py)."""

    name: str
    start_epoch: int | None = _rule(None, min=0)
    start_step: int | None = _rule(None, min=0)
    train: list[str]
    frozen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.start_epoch is None) == (self.start_step is None):
            raise ValueError(f"phase '{self.name}' needs exactly one of start_epoch and start_step")


def check_phase_order(phases: Sequence[FreezePhase]) -> None:
    """The schedule's shape: all phases start on the same unit (so their order is well defined), in
    strictly increasing order, the first at 0 (so every moment of training has a phase)."""
    if not phases:
        return
    by_epoch = phases[0].start_epoch is not None
    unit = "start_epoch" if by_epoch else "start_step"
    starts = [phase.start_epoch if by_epoch else phase.start_step for phase in phases]
    if any(start is None for start in starts):
        raise ValueError("phases must all use start_epoch or all use start_step, not a mix")
    if starts[0] != 0:
        raise ValueError(f"the first phase ('{phases[0].name}') must have {unit} 0, got {starts[0]}")
    for i in range(1, len(phases)):
        if starts[i] <= starts[i - 1]:
            raise ValueError(
                f"phases must be sorted by strictly increasing {unit}: '{phases[i].name}' ({starts[i]}) "
                f"follows '{phases[i - 1].name}' ({starts[i - 1]})"
            )


@dataclass
class FreezeConfig:
    phases: list[FreezePhase] = field(default_factory=list)  # empty = everything trains

    def __post_init__(self) -> None:
        check_phase_order(self.phases)


@dataclass
class CheckpointConfig:
    every_steps: int = _rule(0, min=0)  # 0 = only at epoch end
    keep_last: int = _rule(3, min=1)
    resume: bool = True  # auto-resume from the newest valid checkpoint in run_dir


@dataclass
class EvalConfig:
    every_epochs: int = _rule(1, min=0)  # 0 = never during training
    test_at_end: bool = True
    score_threshold: float = _rule(0.0, min=0.0, max=1.0)
    # Detections per image: the model keeps at most this many (box_detections_per_img of Faster R-CNN,
    # detections_per_img of the others) and COCOeval counts as many (its largest maxDets; 1 and 10 stay for AR).
    # Raise it for scenes with more objects than that: recall can never exceed max_detections / objects.
    max_detections: int = _rule(100, min=1)
    # The confusion matrix of a test evaluation counts detections scoring at least this (Ultralytics' 0.25): one
    # operating point, where the PR curves show them all.
    confusion_score: float = _rule(0.25, min=0.0, max=1.0)


@dataclass
class WandbConfig:
    # None = WANDB_MODE from the environment, else offline without an API key
    mode: str | None = _rule(None, choices=WANDB_MODES)
    project: str = "product-attributes"
    group: str | None = None
    name: str | None = None
    log_images: int = _rule(4, min=0)


@dataclass
class Config:
    run_dir: str = "runs/demo"
    seed: int = 0
    strategy: str = _rule("auto", choices=STRATEGY_KINDS)  # auto: ddp under torchrun
    device: str = _rule("auto", choices=DEVICES)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2 scalars: `off`/`no` stay strings (so `train.amp=off` is the string
    the schema expects, not False) and `1e-4` is a float, not a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then each `dotted.key=value` override in order.

    Raises ValueError naming the key and its source (the file or "command line") for unknown keys,
    wrong types, values out of range and malformed overrides; YAML syntax errors name the file and line.
    """
    cfg = Config()
    if path is not None:
        cfg = _merge(Config, _read_yaml_file(Path(path)), str(path), "", cfg)
    for override in overrides:
        cfg = _merge(Config, _parse_override(override), COMMAND_LINE, "", cfg)
    _check_across_sections(cfg)
    return cfg


def _check_across_sections(cfg: Config) -> None:
    """Rules that tie options of two sections together, checked once on the final config (a file may set one
    half, the command line the other)."""
    if cfg.data.augment != "hflip" and cfg.model.name in FIXED_SIZE_MODELS:
        raise ValueError(f"data.augment: {cfg.data.augment} sizes training images in the reader, but model.name "
                         f"{cfg.model.name} resizes every image to its own fixed size: use data.augment=hflip")
    if cfg.train.patience and not cfg.eval.every_epochs:
        raise ValueError(
            f"train.patience={cfg.train.patience} counts validations, but eval.every_epochs=0 never validates: "
            "set eval.every_epochs, or leave train.patience null"
        )


def model_config_from_dict(saved: dict[str, Any], source: str) -> ModelConfig:
    """The `model` section of a saved config (a checkpoint's); keys it predates take today's defaults."""
    return _merge(ModelConfig, saved, source, "model.")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically; load_config(path) gives back an equal Config."""
    write_text_atomically(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {_show(data)}")
    return data


def _parse_override(override: str) -> dict[str, Any]:
    """'optim.lr=0.01' -> {'optim': {'lr': 0.01}}; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"{COMMAND_LINE}: malformed override '{override}' (expected dotted.key=value)")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or error
        raise ValueError(f"{COMMAND_LINE}: {key}: cannot parse value '{text}' as YAML: {problem}") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _merge(cls: type, data: Any, source: str, where: str, base: Any = None) -> Any:
    """Build a `cls` dataclass from the mapping `data`; keys `data` lacks come from `base`, else defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {where.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {} if base is None else {name: getattr(base, name) for name in fields}
    for key, value in data.items():
        if f"{where}{key}" in MOVED_KEYS:
            if value is None:  # as configs saved before the move hold it: nothing was set
                continue
            replacement, why = MOVED_KEYS[f"{where}{key}"]
            raise ValueError(f"{source}: '{where}{key}' is no longer an option: set {replacement} instead ({why})")
        if key not in fields:
            raise ValueError(f"{source}: unknown key '{where}{key}'{_suggestion(cls, where, str(key))}")
        values[key] = _convert(hints[key], value, source, f"{where}{key}", values.get(key))
        _check_rules(fields[key].metadata, values[key], source, f"{where}{key}")
    no_default = dataclasses.MISSING
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is no_default and f.default_factory is no_default
    ]
    if missing:
        raise ValueError(f"{source}: {where.rstrip('.') or 'config'}: missing key '{missing[0]}'")
    try:
        return cls(**values)
    except ValueError as error:
        raise ValueError(f"{source}: {where.rstrip('.') or 'config'}: {error}") from None


def _convert(hint: Any, value: Any, source: str, key: str, current: Any = None) -> Any:
    """Check `value` against the type hint; ints become floats where a float is expected."""
    if dataclasses.is_dataclass(hint):
        return _merge(hint, value, source, f"{key}.", current)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        try:
            return _convert(inner, value, source, key, current)
        except _WrongType:
            raise _WrongType(source, key, f"{_type_name(inner)} or null", value) from None
    if origin is list:
        if not isinstance(value, list):
            raise _WrongType(source, key, f"a list of {_type_name(args[0])}", value)
        return [_convert(args[0], item, source, f"{key}[{index}]") for index, item in enumerate(value)]
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[hint]
    if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
        raise _WrongType(source, key, hint.__name__, value)
    return float(value) if hint is float else value


class _WrongType(ValueError):
    def __init__(self, source: str, key: str, expected: str, value: Any) -> None:
        super().__init__(f"{source}: {key}: expected {expected}, got {_show(value)}")


def _check_rules(rules: typing.Mapping[str, Any], value: Any, source: str, key: str) -> None:
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        choices = ", ".join(rules["choices"])
        raise ValueError(f"{source}: {key}: expected one of {choices}, got {_show(value)}")
    if "min" in rules and value < rules["min"]:
        raise ValueError(f"{source}: {key}: must be >= {rules['min']}, got {_show(value)}")
    if "max" in rules and value > rules["max"]:
        raise ValueError(f"{source}: {key}: must be <= {rules['max']}, got {_show(value)}")


def _suggestion(cls: type, where: str, key: str) -> str:
    """' (did you mean 'optim.lr'?)' from the known keys at and below this level, or ''."""
    known = [where + name for name in _dotted_keys(cls)]
    close = difflib.get_close_matches(where + key, known, n=1)
    if not close:  # a right name at the wrong level, such as a top-level 'lr'
        close = [name for name in known if name.rsplit(".", 1)[-1] == key][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _dotted_keys(cls: type) -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(name)
        if dataclasses.is_dataclass(hint):
            keys += [f"{name}.{sub}" for sub in _dotted_keys(hint)]
    return keys


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return "a mapping" if dataclasses.is_dataclass(hint) else hint.__name__


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)
