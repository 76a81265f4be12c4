"""The recipe schema: one dataclass per YAML section.

Only plain data lives here; loading, overrides and validation are in ``train.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from data.config import DataConfig
from train.models import DEFAULT_FAMILY, FAMILIES


@dataclass
class ModelConfig:
    family: Literal[FAMILIES] = DEFAULT_FAMILY  # type: ignore[valid-type]  # the registered families (train.models)
    pretrained: str = ""  # Hub id or local diffusers folder (model_index.json)
    revision: Optional[str] = None
    # Build a tiny random-weight pipeline of `family` at `pretrained` when that folder does not exist
    # (quickstart and smoke tests; never for real recipes).
    create_tiny_random: bool = False


@dataclass
class AttentionConfig:
    """Checked by ``train.attention.check.check_attention_config`` (recipes, the sampler and the router).

    ``train/sample.py`` turns every field into a flag (``--attention`` for ``type``, ``--block-size`` ...) with the
    ``help`` text given here."""

    type: str = field(default="radial", metadata={"help": "a name of train.attention.methods.METHODS"})
    backend: Literal["auto", "fa4", "triton", "torch"] = field(default="auto", metadata={"help": "auto | fa4 | triton | torch"})
    block_size: int = field(default=128, metadata={"help": "attention block size (>= 16, what the block-sparse kernels accept)"})
    dense_layers: int = field(default=0, metadata={"help": "the first N transformer blocks keep dense attention"})
    # radial
    decay_factor: float = field(default=1.0, metadata={"help": "radial attention decay factor"})
    attention_sink: Optional[bool] = field(
        default=None, metadata={"help": "radial: keep the first frame visible (default: the family's rule)"})
    # svg2
    num_q_clusters: int = field(default=100, metadata={"help": "svg2: query clusters"})
    num_k_clusters: int = field(default=500, metadata={"help": "svg2: key clusters"})
    top_p: float = field(default=0.9, metadata={"help": "svg2: attention mass kept per query cluster"})
    min_kc_ratio: float = field(default=0.1, metadata={"help": "svg2: minimum fraction of key clusters kept"})
    kmeans_iters: Optional[int] = field(
        default=None, metadata={"help": "svg2: k-means iterations per call (default: 50 from scratch, 2 warm-started)"})


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class TrainConfig:
    mode: Literal["lora", "full"] = "lora"
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = False
    # under gradient checkpointing: "save_attention" keeps attention outputs + LSE (no second attention forward,
    # B*N*H*D + B*H*N per layer more memory), "full" recomputes the whole block (train/step_speed.py)
    checkpoint_policy: Literal["full", "save_attention"] = "save_attention"
    compile: Optional[bool] = None  # regional torch.compile of the blocks; null: on for CUDA (not ZeRO-3), off on CPU
    timestep_shift: Optional[float] = None  # None: the family's default
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # before the shift
    ema: EmaConfig = field(default_factory=EmaConfig)
    log_every: int = 1
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
    resume_from: Optional[str] = None  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False  # a fresh run may replace the checkpoints/final weights of an earlier run
    max_bad_steps_in_a_row: int = 5  # NaN/inf losses are skipped and counted; stop after this many in a row


@dataclass
class ValidationConfig:
    every_steps: int = 0  # 0: off
    prompts: list[str] = field(default_factory=list)
    frames: Optional[int] = None  # None: data.frames
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0


@dataclass
class TrackingConfig:
    report_to: Literal["wandb", "none"] = "wandb"
    project: str = "longvideo-sparse-ft"
    run_name: Optional[str] = None


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1


@dataclass
class ExportConfig:
    at_end: bool = False  # run train/export.py on the final weights when training ends
    lora_formats: list[str] = field(default_factory=lambda: ["diffusers", "comfyui"])


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
