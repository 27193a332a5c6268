"""Starting weights of a detector: torchvision weights by name or a local file, fetched and loaded.

`model.weights` is a torchvision weights name for the model (DEFAULT, COCO_V1,
FasterRCNN_ResNet50_FPN_Weights.COCO_V1) or a local file: a torchvision state dict or one of our checkpoints (a
dict whose "model" entry is the state dict). `model.weights_backbone` starts only the backbone, from ImageNet
classification weights (a name such as IMAGENET1K_V1, or a local file). Names go through torchvision's weights
API: its URL, torch.hub's cache ($TORCH_HOME/hub/checkpoints) and file name; a cached file is read without any
network access, a missing one is downloaded with a timeout or fails at once with what to do by hand.

COCO files are made for 91 classes, so the tensors whose shape depends on the class count (box predictor,
classification logits) cannot be used for our K+1 classes: they are skipped and reported. Everything else must
match exactly, because a silently half-loaded backbone trains to a worse model without any error. Weights by name
are set up as torchvision's builder sets them up: FrozenBatchNorm2d with the eps torchvision used
(`frozen_batchnorm_eps`) and its default frozen backbone layers (`freeze_backbone_layers_as_torchvision`).
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import os
import re
import socket
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, detection, mobilenet_v3_large, resnet50, vgg16
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.ops import FrozenBatchNorm2d

from train.config import ModelConfig
from train.detectors import BODY_BACKBONE_MODELS, DETECTION_BUILDERS, detector_weights_enum

# Where the class-count dependent tensors live: Faster R-CNN's box predictor, the classification heads of
# RetinaNet / FCOS / SSD. Only tensors under these prefixes may be skipped for a shape mismatch.
CLASS_DEPENDENT_PREFIXES = ("roi_heads.box_predictor.", "head.classification_head.")

# BatchNorm2d counts its updates in this buffer; FrozenBatchNorm2d has none. It is not a weight, so a file
# and a model may disagree about it (COCO files of FrozenBN models, our BN checkpoints) without harm.
BATCHNORM_COUNTER = "num_batches_tracked"

# Torchvision's COCO files that its builders load with FrozenBatchNorm2d eps 0 (else their published box AP is not
# reproduced exactly); every other torchvision file was made with its layers' own eps.
EPS_ZERO_WEIGHTS = frozenset({
    detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1, detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1,
})

# A download waits at most this long for a connection or for each read, so that a machine without network
# fails within seconds instead of hanging.
DOWNLOAD_TIMEOUT_S = 30.0


class PretrainedWeightsUnavailable(FileNotFoundError):
    """Torchvision weights named in the config are not in torch.hub's cache and could not be downloaded."""


@dataclass(frozen=True)
class StartingWeights:
    """What the config says the model starts from: a local file, or torchvision weights by name."""

    key: str  # the config key: "model.weights" or "model.weights_backbone"
    value: str  # as configured
    path: Path  # the local file, or the torchvision file's place in torch.hub's cache
    named: WeightsEnum | None = None  # the torchvision weights the name resolved to; None for a local file


@dataclass(frozen=True)
class SkippedTensor:
    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class WeightsReport:
    """What a file gave: tensors loaded, head tensors skipped for shape, head keys missing; for backbone weights
    the classification tensors the body does not use."""

    source: Path | None = None
    loaded: int = 0
    skipped: list[SkippedTensor] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    name: str | None = None  # torchvision's full name of the weights, when they were given by name
    into: str = "model"  # or "backbone.body" for model.weights_backbone
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.source is None:
            return "weights: none given, random initialisation"
        origin = f"{self.name} ({self.source})" if self.name else str(self.source)
        if self.into != "model":
            return (f"backbone weights {origin}: loaded {self.loaded} tensors into {self.into}, "
                    f"{len(self.unused)} classifier tensors not used ({', '.join(self.unused) or 'none'})")
        skipped = "; ".join(
            f"{s.key} file {list(s.file_shape)} vs model {list(s.model_shape)}" for s in self.skipped
        )
        return (
            f"weights {origin}: loaded {self.loaded} tensors, "
            f"skipped {len(self.skipped)} class-count head tensors ({skipped or 'none'}), "
            f"missing {len(self.missing)} head tensors ({', '.join(self.missing) or 'none'})"
        )


def frozen_batchnorm_eps(cfg: ModelConfig) -> float | None:
    """The eps of the FrozenBatchNorm2d layers `cfg` builds; None: each BatchNorm2d's own.

    It must be the one the starting weights were made with. That is the layers' own (torchvision's builders make
    the same BatchNorm2d eps, frozen or not), except for torchvision's files in EPS_ZERO_WEIGHTS (eps 0), and
    local files for fasterrcnn_resnet50_fpn, which have always been taken as its COCO_V1 file or a model
    fine-tuned from it. Read from the config only (no file), so that trained_model_config can pass it on: the
    eps is no tensor, so a checkpoint's state dict does not hold it.
    """
    if not cfg.frozen_batchnorm:
        return None
    if cfg.frozen_batchnorm_eps is not None:
        return cfg.frozen_batchnorm_eps
    setting = _weights_setting(cfg)
    named = None if setting is None else torchvision_weights(*setting)
    local_r50_file = named is None and cfg.weights is not None and cfg.name == "fasterrcnn_resnet50_fpn"
    return 0.0 if named in EPS_ZERO_WEIGHTS or local_r50_file else None


# ---- starting weights: names, files, torch.hub's cache --------------------------------------------------------
def starting_weights(cfg: ModelConfig) -> StartingWeights | None:
    """What `cfg` starts the model from, checked without any download: names resolved, local files present.

    Raises ValueError for settings that cannot work and FileNotFoundError for a value that is neither a
    weights name of the model nor an existing file; both list the valid names.
    """
    setting = _weights_setting(cfg)
    if setting is None:
        return None
    enum_type, value, key = setting
    named = torchvision_weights(enum_type, value, key)
    if named is not None:
        return StartingWeights(key, str(value), torchvision_cache_path(named), named)
    if Path(value).is_file():
        return StartingWeights(key, str(value), Path(value))
    raise FileNotFoundError(
        f"{key}: {str(value)!r} is neither an existing file nor a weights name of {cfg.name} "
        f"({_valid_names(enum_type)})"
    )


def fetch_starting_weights(cfg: ModelConfig) -> StartingWeights | None:
    """`starting_weights(cfg)`, with a torchvision file downloaded into torch.hub's cache if it is not there.

    The download is torchvision's own (`WeightsEnum.get_state_dict`: its URL, torch.hub's file name and place,
    the hash in the file name checked), under a socket timeout (DOWNLOAD_TIMEOUT_S) so it cannot hang. When it
    fails, one PretrainedWeightsUnavailable says which file, its URL, the exact path to put it at, and that a
    local file path works too. A file already in the cache is used with no network access.
    """
    start = starting_weights(cfg)
    if start is None or start.named is None or start.path.is_file():
        return start
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            start.named.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, http.client.HTTPException, RuntimeError) as error:
        if start.path.is_file():
            raise  # downloaded, but not readable: not a download problem
        raise PretrainedWeightsUnavailable(_unavailable_message(start, error)) from None
    return start


def torchvision_weights(enum_type: type[WeightsEnum], value: str | Path, key: str) -> WeightsEnum | None:
    """The member of `enum_type` that `value` names: DEFAULT, a member name such as COCO_V1, or the full name
    (FasterRCNN_ResNet50_FPN_Weights.COCO_V1); None when it names none (it may be a file path).

    Raises ValueError for the full name of other weights (another model's) or of a member that does not exist.
    """
    if isinstance(value, Path):
        return None
    enum_name, dot, member = value.rpartition(".")
    if not dot:
        return enum_type.__members__.get(value)
    if enum_name == enum_type.__name__ and member in enum_type.__members__:
        return enum_type[member]
    if re.fullmatch(r"\w+_Weights", enum_name):
        raise ValueError(f"{key}: {value} are not weights of this model; valid names: {_valid_names(enum_type)}")
    return None


def torchvision_cache_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps the file of `weights` (what load_state_dict_from_url reads and downloads to):
    $TORCH_HOME/hub/checkpoints/<the URL's file name>, ~/.cache/torch/hub/checkpoints by default."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def full_name(weights: WeightsEnum) -> str:
    return f"{type(weights).__name__}.{weights.name}"


def _weights_setting(cfg: ModelConfig) -> tuple[type[WeightsEnum], str | Path, str] | None:
    """(torchvision's weights enum for the setting, its value, its key) for whichever of model.weights and
    model.weights_backbone is set; None when neither is."""
    if cfg.name not in DETECTION_BUILDERS:
        raise ValueError(f"unknown model name {cfg.name!r}; valid names: {', '.join(DETECTION_BUILDERS)}")
    if cfg.weights is not None and cfg.weights_backbone is not None:
        raise ValueError(
            "model.weights and model.weights_backbone are both set; weights start the whole detector, backbone "
            "included, so set only one"
        )
    builder = DETECTION_BUILDERS[cfg.name]
    if cfg.weights is not None:
        return detector_weights_enum(cfg.name), cfg.weights, "model.weights"
    if cfg.weights_backbone is None:
        return None
    if cfg.name not in BODY_BACKBONE_MODELS:
        raise ValueError(
            f"model.weights_backbone applies to Faster R-CNN, RetinaNet and FCOS models, not to {cfg.name}; "
            "use model.weights for it"
        )
    # the enum the builder's weights_backbone parameter takes, e.g. Optional[ResNet50_Weights]
    annotation = inspect.signature(builder, eval_str=True).parameters["weights_backbone"].annotation
    (enum_type,) = [
        arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, WeightsEnum)
    ]
    return enum_type, cfg.weights_backbone, "model.weights_backbone"


def _valid_names(enum_type: type[WeightsEnum]) -> str:
    members = [name for name in enum_type.__members__ if name != "DEFAULT"]
    if not members:
        return "torchvision has no weights for it: a local file path"
    full = ", ".join(f"{enum_type.__name__}.{name}" for name in members)
    return f"DEFAULT, {', '.join(members)} or in full {full}; or a local file path"


def _unavailable_message(start: StartingWeights, error: BaseException) -> str:
    file_name = start.path.name
    return (
        f"{start.key}: {start.value} is torchvision's {full_name(start.named)}, file {file_name}, which is not in "
        f"torch.hub's cache and could not be downloaded ({type(error).__name__}: {error}).\n"
        f"  URL:       {start.named.url}\n"
        f"  put it at: {start.path}\n"
        f"Download it where there is network and copy it to exactly that path (torch.hub's cache is "
        f"$TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default), or set {start.key} to a local "
        f"file path."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens its URL without a timeout: the process-wide default it falls back on bounds the
    connection and every read (not name resolution, which fails fast without network)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# ---- loading ----------------------------------------------------------------------------------------------------
def load_starting_weights(model: nn.Module, start: StartingWeights) -> WeightsReport:
    """Load the file `start` names: model.weights into the whole model (class-count head skipped if it does
    not fit), model.weights_backbone into the backbone body."""
    if start.named is not None:
        # torchvision's loader: reads the cached file (no download, fetch_starting_weights made sure it is there)
        state_dict = start.named.get_state_dict(progress=False, check_hash=True, weights_only=True)
    else:
        state_dict = read_state_dict(start.path)
    if start.key == "model.weights_backbone":
        report = load_backbone_state_dict(model, state_dict, source=start.path)
    else:
        report = load_state_dict_fitting(model, state_dict, source=start.path)
    report.name = None if start.named is None else full_name(start.named)
    return report


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A torchvision state dict, or the "model" state dict of one of our checkpoints, from a local file."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = content.get("model") if isinstance(content, Mapping) and "model" in content else content
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"weights file {path} holds neither a state dict nor a checkpoint with a 'model' state dict"
        )
    return state_dict


def load_state_dict_fitting(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path
) -> WeightsReport:
    """Load state_dict strictly, except for class-count head tensors that do not fit (skipped, reported)."""
    expected = model.state_dict()
    report = WeightsReport(source=source)
    to_load: dict[str, torch.Tensor] = {}
    unexpected, missing, misshapen = [], [], []
    for key, tensor in state_dict.items():
        if key not in expected:
            if not key.endswith(BATCHNORM_COUNTER):
                unexpected.append(key)
        elif tensor.shape == expected[key].shape:
            to_load[key] = tensor
        elif key.startswith(CLASS_DEPENDENT_PREFIXES):
            report.skipped.append(SkippedTensor(key, tuple(tensor.shape), tuple(expected[key].shape)))
        else:
            misshapen.append(f"{key} file {list(tensor.shape)} vs model {list(expected[key].shape)}")
    for key in expected:
        if key not in state_dict and not key.endswith(BATCHNORM_COUNTER):
            (report.missing if key.startswith(CLASS_DEPENDENT_PREFIXES) else missing).append(key)
    findings = {"unexpected keys": unexpected, "missing keys": missing, "shape mismatches": misshapen}
    problems = [f"{len(keys)} {label} (first: {keys[0]})" for label, keys in findings.items() if keys]
    if problems:
        raise ValueError(
            f"weights file {source} does not fit model {type(model).__name__}: {'; '.join(problems)}. "
            "Was it saved from another architecture?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report


def load_backbone_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path
) -> WeightsReport:
    """Load an ImageNet classification state dict into the detector's backbone body, as torchvision's builders
    do: the body is the classification network up to its last feature layer, under the same names (ResNet:
    conv1 ... layer4) or under those of its `features` (MobileNetV3: "features.3.block..." is "3.block...").
    Every body tensor must come from the file; only the classifier's tensors (fc, classifier) are left out."""
    body = model.backbone.body
    expected = {key: tensor for key, tensor in body.state_dict().items() if not key.endswith(BATCHNORM_COUNTER)}
    prefix = next((p for p in ("", "features.") if all(p + key in state_dict for key in expected)), None)
    if prefix is None:
        absent = [key for key in expected if key not in state_dict and "features." + key not in state_dict]
        raise ValueError(
            f"backbone weights file {source} lacks {len(absent)} tensors of the backbone body (first: {absent[0]}); "
            f"model.weights_backbone takes the classification network's state dict (for {type(body).__name__} "
            "of this model), model.weights a whole detector's"
        )
    misshapen = [f"{key} file {list(state_dict[prefix + key].shape)} vs model {list(tensor.shape)}"
                 for key, tensor in expected.items() if state_dict[prefix + key].shape != tensor.shape]
    body_modules = {key.split(".")[0] for key in expected}
    unused = [key for key in state_dict
              if not key.endswith(BATCHNORM_COUNTER) and key.removeprefix(prefix) not in expected]
    inside_body = [key for key in unused if key.startswith(prefix) and (prefix or key.split(".")[0] in body_modules)]
    if misshapen or inside_body:
        problems = misshapen[:1] + [f"unexpected key {key}" for key in inside_body[:1]]
        raise ValueError(f"backbone weights file {source} does not fit the backbone body: {'; '.join(problems)}")
    body.load_state_dict({key: state_dict[prefix + key] for key in expected}, strict=False)
    return WeightsReport(source=source, loaded=len(expected), into="backbone.body", unused=unused)


# ---- the layers torchvision freezes ---------------------------------------------------------------------------------
def freeze_backbone_layers_as_torchvision(model: nn.Module, cfg: ModelConfig) -> int:
    """Set requires_grad False on the backbone parameters that torchvision's builder freezes for pretrained
    weights by default; returns how many parameters that froze."""
    parameters = dict(model.named_parameters())
    frozen = torchvision_frozen_parameters(cfg.name, cfg.frozen_batchnorm)
    absent = sorted(frozen - parameters.keys())
    if absent:
        raise RuntimeError(f"torchvision's {cfg.name} backbone has parameters this model lacks (first: {absent[0]})")
    for key in frozen:
        parameters[key].requires_grad_(False)
    return len(frozen)


def torchvision_frozen_parameters(name: str, frozen_batchnorm: bool) -> set[str]:
    """Names of the parameters torchvision's `name` builder freezes for pretrained weights by default.

    The builder keeps only the last `trainable_backbone_layers` layers of the backbone trainable: by default 3
    for ResNet-50 and MobileNetV3 FPN backbones, 4 of VGG16's 5 for SSD300, all 6 for SSDlite. Which parameters
    those are is learnt by running torchvision's own backbone cutting on a meta-device (data-free) backbone.
    """
    norm_layer = FrozenBatchNorm2d if frozen_batchnorm else None  # None: the network's own BatchNorm2d
    with torch.device("meta"):
        if "resnet50" in name:
            prefix = "backbone.body."
            cut = _resnet_fpn_extractor(resnet50(norm_layer=norm_layer), 3).body
        elif name.startswith("fasterrcnn_mobilenet_v3_large"):
            prefix = "backbone.body."
            cut = _mobilenet_extractor(mobilenet_v3_large(norm_layer=norm_layer), True, 3).body
        elif name == "ssd300_vgg16":
            prefix, cut = "backbone.", _vgg_extractor(vgg16(), False, 4)
        else:  # ssdlite320_mobilenet_v3_large
            return set()
    return {prefix + key for key, parameter in cut.named_parameters() if not parameter.requires_grad}
