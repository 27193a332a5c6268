"""train/config.py: defaults, YAML and command-line precedence, errors naming key and source, round trip."""

from pathlib import Path

import pytest
import yaml

from train.config import Config, FreezePhase, config_to_dict, load_config, save_config
from train.strategy import DEVICES, STRATEGY_KINDS
from train.wandb_run import WANDB_MODES

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.yaml"))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_match_the_schema():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.run_dir, cfg.strategy, cfg.device) == ("runs/demo", "auto", "auto")
    assert cfg.data.manifest == "data/synth/shards/manifest.json"
    assert cfg.model.weights is None and cfg.model.frozen_batchnorm is True
    assert cfg.optim.lr == 0.02 and cfg.optim.milestones == [16, 22]
    assert cfg.optim.reference_batch_size is None
    assert cfg.train.amp == "off" and cfg.freeze.phases == []
    assert cfg.wandb.mode is None


def test_file_then_overrides_in_order(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "optim:\n  lr: 0.1\n  gamma: 0.5\ndata:\n  batch_size: 4\n")
    cfg = load_config(path, ["optim.lr=0.01", "data.num_workers=0", "data.num_workers=3"])
    assert cfg.optim.lr == 0.01  # command line beats the file
    assert cfg.optim.gamma == 0.5 and cfg.data.batch_size == 4  # the file beats the defaults
    assert cfg.optim.momentum == 0.9  # untouched default within a section the file sets
    assert cfg.data.num_workers == 3  # the last override wins


def test_override_values_are_parsed_as_yaml(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "model:\n  weights: some/file.pth\n")
    cfg = load_config(path, [
        "model.weights=null",
        "optim.milestones=[3,4]",
        "optim.weight_decay=1e-5",
        "optim.clip_grad_norm=10",
        "train.amp=off",
        "wandb.mode=disabled",
        "freeze.phases=[{name: heads, start_step: 0, train: [rpn, roi_heads]}, "
        "{name: all, start_step: 50, train: ['*']}]",
    ])
    assert cfg.model.weights is None
    assert cfg.optim.milestones == [3, 4]
    assert cfg.optim.weight_decay == 1e-5  # plain yaml.safe_load would give the string '1e-5'
    assert cfg.optim.clip_grad_norm == 10.0 and isinstance(cfg.optim.clip_grad_norm, float)
    assert cfg.train.amp == "off"  # plain yaml.safe_load would give False
    assert cfg.wandb.mode == "disabled"
    assert cfg.freeze.phases == [
        FreezePhase(name="heads", start_step=0, train=["rpn", "roi_heads"]),
        FreezePhase(name="all", start_step=50, train=["*"]),
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("lr=0.1", "command line: unknown key 'lr' (did you mean 'optim.lr'?)"),
        ("optim.lr=abc", "command line: optim.lr: expected float, got 'abc'"),
        ("data.batch_size=true", "command line: data.batch_size: expected int, got true"),
        ("data.batch_size=2.5", "command line: data.batch_size: expected int, got 2.5"),
        ("model.min_size=null", "command line: model.min_size: expected int, got null"),
        ("model.weights=[a]", "command line: model.weights: expected str or null, got ['a']"),
        ("optim.milestones=[8,x]", "command line: optim.milestones[1]: expected int, got 'x'"),
        ("optim.milestones=8", "command line: optim.milestones: expected a list of int, got 8"),
        ("optim=0.1", "command line: optim: expected a mapping, got 0.1"),
        ("strategy=ddp2", "command line: strategy: expected one of auto, ddp, dp, single, got 'ddp2'"),
        ("device=gpu", "command line: device: expected one of auto, cpu, cuda, got 'gpu'"),
        ("optim.name=adam", "command line: optim.name: expected one of sgd, adamw, got 'adam'"),
        ("optim.schedule=step", "command line: optim.schedule: expected one of multistep, cosine, constant"),
        ("train.amp=fp8", "command line: train.amp: expected one of off, bf16, fp16, got 'fp8'"),
        ("wandb.mode=on", "command line: wandb.mode: expected one of online, offline, disabled, got 'on'"),
        ("data.batch_size=0", "command line: data.batch_size: must be >= 1, got 0"),
        ("optim.accumulate_steps=0", "command line: optim.accumulate_steps: must be >= 1, got 0"),
        ("data.hflip_prob=1.5", "command line: data.hflip_prob: must be <= 1.0, got 1.5"),
        ("optim.milestones=[11,8]", "command line: optim: milestones must be strictly increasing"),
        ("optim.lr", "command line: malformed override 'optim.lr' (expected dotted.key=value)"),
        ("=0.1", "command line: malformed override '=0.1'"),
        ("optim..lr=0.1", "command line: malformed override 'optim..lr=0.1'"),
        ("optim.milestones=[8,", "command line: optim.milestones: cannot parse value '[8,' as YAML"),
        ("train.ema_decay=1.5", "command line: train.ema_decay: must be <= 1.0, got 1.5"),
        ("train.patience=-1", "command line: train.patience: must be >= 0, got -1"),
        # fault injection is the tests' business (train/run_checkpoint.py), not a section of the user's config
        ("debug.fail_at_step=1", "command line: unknown key 'debug'"),
    ],
)
def test_bad_override_names_key_and_source(override, message):
    with pytest.raises(ValueError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_patience_without_validation_is_an_error_once_every_source_is_merged(tmp_path):
    config = tmp_path / "patient.yaml"
    config.write_text("train:\n  patience: 3\neval:\n  every_epochs: 0\n")
    with pytest.raises(ValueError, match="train.patience=3 counts validations, but eval.every_epochs=0"):
        load_config(config)
    # the command line may mend what the file alone gets wrong
    assert load_config(config, ["eval.every_epochs=2"]).train.patience == 3
    assert load_config(config, ["train.patience=null"]).train.patience is None


@pytest.mark.parametrize(
    ("key", "owners_choices"),
    [("strategy", STRATEGY_KINDS), ("device", DEVICES), ("wandb.mode", WANDB_MODES)],
)
def test_choices_come_from_the_module_that_owns_them(key, owners_choices):
    for choice in owners_choices:
        load_config(None, [f"{key}={choice}"])
    with pytest.raises(ValueError) as error:
        load_config(None, [f"{key}=bogus"])
    assert f"command line: {key}: expected one of {', '.join(owners_choices)}, got 'bogus'" in str(error.value)


def test_wandb_shared_mode_is_not_offered():
    # wandb.init takes "shared" (several processes logging to one run); here rank 0 alone logs
    assert "shared" not in WANDB_MODES
    with pytest.raises(ValueError, match="wandb.mode: expected one of online, offline, disabled, got 'shared'"):
        load_config(None, ["wandb.mode=shared"])


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        (
            "[{name: a, start_epoch: 1, train: ['*']}]",
            "freeze: the first phase ('a') must have start_epoch 0, got 1",
        ),
        (
            "[{name: a, train: ['*']}]",
            "freeze.phases[0]: phase 'a' needs exactly one of start_epoch and start_step",
        ),
        (
            "[{name: a, start_epoch: 0, start_step: 0, train: ['*']}]",
            "freeze.phases[0]: phase 'a' needs exactly one of start_epoch and start_step",
        ),
        ("[{name: a, start_epoch: 0}]", "freeze.phases[0]: missing key 'train'"),
        ("[{name: a, start_epoch: 0, train: ['*'], frozn: [x]}]", "unknown key 'freeze.phases[0].frozn'"),
        (
            "[{name: a, start_epoch: 0, train: ['*']}, {name: b, start_step: 9, train: ['*']}]",
            "freeze: phases must all use start_epoch or all use start_step",
        ),
        (
            "[{name: a, start_epoch: 0, train: ['*']}, {name: b, start_epoch: 0, train: [rpn]}]",
            "freeze: phases must be sorted by strictly increasing start_epoch: 'b' (0) follows 'a' (0)",
        ),
        ("[{name: a, start_epoch: -1, train: ['*']}]", "freeze.phases[0].start_epoch: must be >= 0, got -1"),
    ],
)
def test_bad_freeze_schedule_is_rejected_at_load(phases, message):
    with pytest.raises(ValueError) as error:
        load_config(None, [f"freeze.phases={phases}"])
    assert f"command line: {message}" in str(error.value)


def test_file_errors_name_the_file(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"x\.yaml: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        load_config(path)

    path = write_yaml(tmp_path / "types.yaml", "train:\n  epochs: 2\n  amp: yes\n")
    with pytest.raises(ValueError, match=r"types\.yaml: train\.amp: expected one of .*, got 'yes'"):
        load_config(path)

    path = write_yaml(tmp_path / "top.yaml", "- just\n- a list\n")
    with pytest.raises(ValueError, match=r"top\.yaml: expected a mapping of config keys at the top level"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "optim:\n  lr: 0.1\n  milestones: [8, 11\ntrain:\n  epochs: 2\n"
    path = write_yaml(tmp_path / "broken.yaml", text)
    with pytest.raises(ValueError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}:4: YAML syntax error")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path / "empty.yaml", "# nothing set\n")) == Config()


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, [
        "run_dir=runs/x",
        "strategy=ddp",
        "optim.name=adamw",
        "optim.lr=3",
        "optim.clip_grad_norm=1.5e-3",
        "optim.milestones=[1,2,3]",
        "model.weights=weights/w.pth",
        "wandb.mode=offline",
        "train.max_steps=7",
        "train.amp=off",
        "freeze.phases=[{name: a, start_epoch: 0, train: ['*'], frozen: [backbone.body]}, "
        "{name: b, start_epoch: 2, train: ['*']}]",
    ])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    saved = yaml.safe_load(path.read_text())
    assert saved == config_to_dict(cfg)
    assert saved["freeze"]["phases"][0] == {
        "name": "a", "start_epoch": 0, "start_step": None, "train": ["*"], "frozen": ["backbone.body"]
    }
    assert saved["train"]["amp"] == "off" and saved["optim"]["lr"] == 3.0


def test_configs_dir_is_not_empty():
    assert {path.name for path in CONFIG_FILES} >= {
        "demo_cpu.yaml", "coco2000.yaml", "coco_1x.yaml", "finetune_heads.yaml"
    }


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg != Config()
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_configs_say_what_the_brief_asks():
    demo = load_config(CONFIGS_DIR / "demo_cpu.yaml")
    assert demo.model.name == "fasterrcnn_mobilenet_v3_large_stride16_fpn" and demo.model.weights is None
    assert demo.model.frozen_batchnorm is False and demo.freeze.phases == []
    # the recipe that makes the demo detect on 2 CPU cores: a narrow, lightly sampled box head (docs/benchmarks.md)
    assert demo.model.builder_kwargs.representation_size < 1024
    assert demo.model.builder_kwargs.box_batch_size_per_image < 512

    coco2000 = load_config(CONFIGS_DIR / "coco2000.yaml")
    assert coco2000.data.manifest == "data/coco2000/manifest.json" and coco2000.train.epochs == 5
    assert [phase.start_epoch for phase in coco2000.freeze.phases] == [0, 2, 4]
    assert (coco2000.optim.lr, coco2000.optim.reference_batch_size, coco2000.train.amp) == (0.02, 16, "bf16")
    assert coco2000.model.weights == "DEFAULT"  # torchvision's COCO weights, through torch.hub's cache

    coco_1x = load_config(CONFIGS_DIR / "coco_1x.yaml")
    assert (coco_1x.train.epochs, coco_1x.optim.milestones, coco_1x.optim.warmup_steps) == (12, [8, 11], 1000)
    assert (coco_1x.model.weights, coco_1x.model.weights_backbone) == (None, "IMAGENET1K_V1")

    finetune = load_config(CONFIGS_DIR / "finetune_heads.yaml")
    assert finetune.model.weights is not None and finetune.optim.lr < 0.02
