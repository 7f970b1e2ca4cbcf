"""Typed run configuration: dataclass defaults <- preset YAML <- ``key=value`` overrides.

OmegaConf does the merging and type coercion against the dataclass schema, so an unknown key or a
value of the wrong type fails here, naming the key, before any process group or data loader starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESETS = Path(__file__).parent / "presets"
SMOKE = PRESETS / "_smoke.yaml"


class ConfigError(ValueError):
    pass


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    shards: str = "shards/synthetic"  # folder holding manifest.json and the tar shards
    # A real dataset's folder or archive, packed by `run` when the shards are missing. Empty: the
    # dataset's synthetic twin (`retina-dist synth`, n samples) is written and packed instead.
    src: str = ""
    oct_src: str = ""  # fusion: the Kermany folder or archive (src is APTOS)
    n: int = 2000  # synthetic: samples to generate when packing
    pack_size: int = 128  # synthetic: generated size; real datasets: --max-side at pack time
    image_size: int = 64  # network input size
    in_chans: int = 3
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 256
    augment: bool = True
    # Where the training augmentation runs: worker (OpenCV in the loader workers) | device (the
    # accelerator, workers only decode) | auto (device when training on CUDA, else worker).
    augment_on: str = "auto"
    # The foundation-model recipe's extra augmentations (off by default): a timm RandAugment string,
    # e.g. rand-m9-mstd0.5-inc1 (run in the loader workers on the training-size image), and the
    # probability of random erasing with per-pixel noise (on the device, after normalisation).
    randaugment: str = ""
    reprob: float = 0.0
    # Training fails once more than this share of an epoch's samples cannot be decoded (each one is
    # skipped, counted in the log and in TensorBoard's data/skipped).
    max_skipped_frac: float = 0.05
    balance: str = "none"  # none | repeat: class-balanced repeat-factor sampling in the training stream
    repeat_thresh: float = 0.0  # repeat-factor threshold t (0: the largest class share)
    train_split: str = "train"
    val_split: str = "val"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        _choice("data.balance", self.balance, ("none", "repeat"))
        _choice("data.augment_on", self.augment_on, ("auto", "worker", "device"))
        if not 0.0 <= self.reprob <= 1.0:
            raise ConfigError(f"data.reprob={self.reprob}: a probability, 0 to 1")
        if not 0.0 <= self.max_skipped_frac <= 1.0:
            raise ConfigError(f"data.max_skipped_frac={self.max_skipped_frac}: a fraction, 0 to 1")
        if self.randaugment:
            if self.augment_on == "device":
                raise ConfigError(
                    "data.randaugment runs timm's PIL ops in the loader workers after the warp, so it "
                    "cannot follow the device warp: use data.augment_on=worker (or auto)"
                )
            from retina_dist.data.stream.recipe_augment import parse_randaugment

            try:
                parse_randaugment(self.randaugment, self.image_size, self.in_chans, self.mean)
            except ValueError as err:
                raise ConfigError(f"data.randaugment: {err}") from None


@dataclass
class ModelConfig:
    name: str = "convnext_atto"  # any timm model name (the shared backbone for dual_eye)
    arch: str = "single"  # single | dual_eye (ODIR left+right) | late_fusion (fundus+OCT encoders)
    pretrained: str = ""  # a local .safetensors/.pth file; compute nodes are offline
    drop_path: float = 0.0
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    heads: int = 8  # dual_eye: cross-attention heads
    embed_dim: int = 256  # dual_eye: per-eye projection width; late_fusion: MLP hidden width
    # late_fusion: the two frozen encoders, each a run folder (its latest checkpoint) or a weights file
    fundus_encoder: str = ""
    fundus_name: str = "resnet18"
    oct_encoder: str = ""
    oct_name: str = "resnet18"
    # ViTs: "" keeps the model's default; avg pools the patch tokens (cls excluded) through fc_norm,
    # RETFound's head; token takes the cls token.
    global_pool: str = ""
    # Train the classifier head alone on a frozen encoder (RETFound's linear-probing protocol).
    freeze_backbone: bool = False

    def __post_init__(self) -> None:
        _choice("model.arch", self.arch, ("single", "dual_eye", "late_fusion"))
        _choice("model.global_pool", self.global_pool, ("", "token", "avg"))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still computed and checked)
    label_smoothing: float = 0.0
    backbone_lr_mult: float = 1.0  # lr factor for the backbone (dual_eye reference: 0.1)
    # auto: cross-entropy (multiclass) or BCE (multilabel) | ce | bce | focal | hybrid
    # (0.5 weighted BCE + 0.5 focal, the ODIR recipe)
    loss: str = "auto"
    pos_weight: bool = False  # BCE: per-class (negatives / positives) from the manifest's train histogram
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # BEiT-style layer-wise lr decay (timm's param_groups_layer_decay): the head at lr, each earlier
    # block at a further factor of this, the patch embedding lowest. 0 turns it off; RETFound: 0.65.
    layer_decay: float = 0.0
    # Base lr: when > 0, lr = blr x effective batch (batch x accum x ranks) / 256, as MAE/RETFound set it.
    blr: float = 0.0
    # Mixup / CutMix on the device batch (timm's Mixup; its label smoothing is optim.label_smoothing).
    # 0 alpha turns each off; with both on, a batch is one or the other (switch_prob: CutMix's share).
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        _choice("optim.loss", self.loss, ("auto", "ce", "bce", "focal", "hybrid"))
        if not 0.0 <= self.layer_decay <= 1.0:
            raise ConfigError(f"config key 'optim.layer_decay': in [0, 1], got {self.layer_decay}")


@dataclass
class TrainConfig:
    strategy: str = "ddp"  # ddp | deepspeed (ZeRO 0-2: deepspeed.zero_stage) | fsdp (FSDP2, weights sharded)
    epochs: int = 5
    batch_size: int = 32  # per rank and micro-step
    accum_steps: int = 1
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler, GPU only)
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    keep_last: int = 2
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs)
    # With --nproc: restarts of all local ranks after one fails (torchrun's elastic restarts), each
    # resuming from the latest checkpoint.
    max_restarts: int = 0
    # EMA of the weights (timm's ModelEmaV3) after each step, checkpointed, and evaluated beside the
    # raw weights (metrics key and TensorBoard tags <split>_ema). 0 turns it off; typical 0.9998.
    ema_decay: float = 0.0
    # DDP: write checkpoints on a background thread; a step then waits only for a CPU copy of the
    # state. The commit is the same (atomic file, sha256, then ``latest``). DeepSpeed saves stay
    # synchronous (every rank writes its partition in a collective).
    async_save: bool = False

    def __post_init__(self) -> None:
        _choice("train.strategy", self.strategy, ("ddp", "deepspeed", "fsdp"))
        if self.async_save and self.strategy != "ddp":
            raise ConfigError(
                "train.async_save covers DDP's one-file checkpoints; DeepSpeed and FSDP write each "
                "rank's partition in a collective save, synchronously"
            )
        _choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        if self.strategy == "fsdp" and self.amp == "fp16":
            raise ConfigError("train.strategy=fsdp takes train.amp=bf16 or none, not fp16")
        if self.strategy == "fsdp" and self.ema_decay:
            raise ConfigError(
                "train.ema_decay with train.strategy=fsdp: the EMA would be a full replica of the "
                "weights on every rank, which sharding exists to avoid"
            )
        for key in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}': must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "max_restarts", "keep_last"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'train.{key}': must be >= 0, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated after training
    batch_size: int = 64
    every_epochs: int = 1  # validation during training; 0 = only at the end
    tta: bool = False  # average the probabilities of the image and its horizontal flip
    calibrate: bool = True  # fit a temperature (and multi-label thresholds) on val, apply to other splits
    # The validation metric that picks best.pt (higher is better): auto is accuracy (multi-class) or
    # macro_auroc (multi-label); any metrics.json key, e.g. qwk, macro_auroc, odir_final, riadd_final.
    best_metric: str = "auto"
    # Where patients have several images: patient-level results from the mean (or per-class max) of
    # their images' calibrated probabilities, beside the image-level ones (<split>_patients).
    patient_agg: str = "mean"

    def __post_init__(self) -> None:
        _choice("eval.patient_agg", self.patient_agg, ("mean", "max", "none"))


@dataclass
class CamConfig:
    """The CAM pass at the end of `retina-dist run` (and the defaults of `retina-dist cam`)."""

    enabled: bool = True
    split: str = "val"
    method: str = "gradcam"  # gradcam | gradcam++ | xgradcam | layercam | eigencam | ig | rollout (ViTs)
    select: str = "per-class:4"  # all | errors | correct | per-class:K
    limit: int = 40  # at most this many samples (0: no limit)
    target_layer: str = ""  # a module path; empty: the family's default


@dataclass
class DeepSpeedConfig:
    """Used when train.strategy=deepspeed; the DeepSpeed JSON is generated from this and train/optim."""

    zero_stage: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"config key 'deepspeed.zero_stage': {self.zero_stage} is not 0, 1 or 2")


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_s: int = 900

    def __post_init__(self) -> None:
        _choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: str = "auto"  # auto: a bar on a TTY, plain lines otherwise | bar | lines | off

    def __post_init__(self) -> None:
        if self.progress == "False":  # YAML 1.1 reads a bare `off` as false
            self.progress = "off"
        _choice("log.progress", self.progress, ("auto", "bar", "lines", "off"))


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    log: LogConfig = field(default_factory=LogConfig)


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    path = PRESETS / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml") if not p.stem.startswith("_"))
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(known)}")
    return path


def load_config(preset: str = "synthetic", overrides: Sequence[str] = (), smoke: bool = False) -> Config:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    layer = OmegaConf.load(preset_path(preset))
    # A preset's own ``smoke:`` section layers after _smoke.yaml (e.g. a small ViT of a ViT-L preset).
    own_smoke = layer.pop("smoke", None) if isinstance(layer, DictConfig) else None
    layers = [layer]
    if smoke:
        layers.append(OmegaConf.load(SMOKE))
        if own_smoke is not None:
            layers.append(own_smoke)
        # A smoke run packs and trains apart, so its tiny shards never stand in for the preset's own.
        base = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        layers.append(
            OmegaConf.create(
                {"run_dir": f"{base.run_dir}-smoke", "data": {"shards": f"{base.data.shards}-smoke"}}
            )
        )
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config), *layers, OmegaConf.from_dotlist(list(overrides))
        )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key {key!r} ({msg})"
    if isinstance(err.__cause__, ConfigError):
        return str(err.__cause__)
    return f"config key {key!r}: {msg}"


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | Path) -> None:
    from retina_dist import atomic

    atomic.write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
