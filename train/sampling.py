"""Generate a video with a family's diffusers pipeline and this project's sparse attention swapped in.

As in the Radial Attention paper's inference, the first ``dense_steps`` denoising steps and the first
``dense_layers`` transformer blocks keep dense attention; the rest use the trained sparse pattern. The dense
steps are switched through the pipeline's ``callback_on_step_end`` extension point and the router's
``force_dense`` switch; the dense layers through ``AttentionConfig.dense_layers``. The attention settings are a
recipe's ``AttentionConfig`` (``SampleOptions.attention``), checked by the same function as a recipe's.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from train.attention.check import check_attention_config
from train.attention.flags import attention_flag
from train.config_schema import AttentionConfig
from train.errors import UserError
from train.exporting import DTYPES, LORA_FILE
from train.models import FAMILIES, get_adapter, pipeline_families



@dataclass
class SampleOptions:
    model: str  # Hub id or local diffusers pipeline folder (model_index.json)
    prompt: str
    out: str = "video.mp4"
    # an export folder, a run folder, final/, a checkpoint folder, a LoRA .safetensors (ours, diffusers', ComfyUI's)
    # or a Hub id
    lora: Optional[str] = None
    lora_scale: float = 1.0
    transformer: Optional[str] = None  # a fine-tuned transformer (export folder with transformer/, or the folder itself)
    family: Optional[str] = None  # needed only when the family can't be read from model_index.json
    revision: Optional[str] = None
    negative_prompt: Optional[str] = None
    frames: int = 81
    height: int = 480
    width: int = 832
    fps: Optional[float] = None  # None: the family's native rate
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # a recipe's attention: section
    dense_steps: int = 0  # the first N denoising steps run dense (dense_layers: attention.dense_layers)
    steps: int = 50
    guidance_scale: Optional[float] = None  # None: the pipeline's default
    seed: int = 0
    dtype: Optional[str] = None  # None: bf16 on CUDA, fp32 on CPU
    device: Optional[str] = None
    vae_tiling: Optional[bool] = None  # None: on for CUDA (long clips decode in tiles instead of running out of memory)
    cpu_offload: bool = False  # diffusers' model CPU offload (large models on one GPU)


@dataclass
class SampleResult:
    path: Path
    family: str
    step_seconds: list[float] = field(default_factory=list)
    step_density: list[float] = field(default_factory=list)  # mean block density of the sparse layers per step
    step_dense: list[bool] = field(default_factory=list)  # the step ran dense (dense_steps)
    num_frames: int = 0
    total_seconds: float = 0.0

    @property
    def mean_step_seconds(self) -> float:
        return float(np.mean(self.step_seconds)) if self.step_seconds else 0.0

    @property
    def sparse_density(self) -> float:
        """Mean density of the sparse layers over the sparse steps (1.0 when everything ran dense)."""
        vals = [d for d, dense in zip(self.step_density, self.step_dense) if not dense]
        return float(np.mean(vals)) if vals else 1.0


# ----------------------------------------------------------------------------------------------------------------
# checks and resolution


def check_options(opts: SampleOptions) -> None:
    check_attention_config(opts.attention, attention_flag)
    for name in ("frames", "height", "width", "steps"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")
    if not isinstance(opts.dense_steps, int) or opts.dense_steps < 0:
        raise ValueError(f"--dense-steps: expected an integer >= 0, got {opts.dense_steps!r}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}; got {opts.dtype!r}")
    if opts.family is not None and opts.family not in FAMILIES:
        raise ValueError(f"--family: expected one of {', '.join(FAMILIES)}; got {opts.family!r}")
    if opts.fps is not None and opts.fps <= 0:
        raise ValueError(f"--fps: expected a positive number, got {opts.fps}")
    if not str(opts.out).lower().endswith(".mp4"):
        raise ValueError(f"--out: expected a .mp4 path, got {opts.out!r}")
    if opts.lora is not None and opts.transformer is not None:
        raise ValueError("--lora and --transformer: give one (a merged export already contains the LoRA)")
    for name in ("lora", "transformer"):
        value = getattr(opts, name)
        if value is not None and _looks_local(value) and not Path(value).exists():
            raise FileNotFoundError(f"--{name}: {value} does not exist")
    if _looks_local(opts.model) and not Path(opts.model).exists():
        raise FileNotFoundError(f"--model: {opts.model} does not exist")


def _looks_local(name: str) -> bool:
    from data.hub_ids import looks_local

    return looks_local(name)


def check_model_not_shadowed(model: str, log: Callable[[str], None]) -> None:
    """``--model org/name`` that exists as a local folder: diffusers would read the folder, not the Hub model.
    A folder a recipe generated (a tiny random model) is refused; another one is used, with a note."""
    from data.hub_ids import has_hub_id_form
    from train.bootstrap import MARKER, read_marker

    folder = Path(model)
    if not has_hub_id_form(model) or not folder.is_dir():
        return
    if read_marker(folder) is not None:
        raise UserError(
            f"--model {model}: ./{model} is a tiny random model a recipe generated ({MARKER}), not the Hub model "
            f"{model}; pass ./{model} to use it, or remove that folder"
        )
    log(f"note: --model {model} is the local folder ./{model}, not the Hub model of that name")


def resolve_family(model: str, family: Optional[str] = None, revision: Optional[str] = None) -> str:
    """The family from model_index.json's ``_class_name`` (local folder or Hub cache); ``family`` when given."""
    index: Optional[dict] = None
    local = Path(model) / "model_index.json"
    if local.is_file():
        index = json.loads(local.read_text())
    elif Path(model).is_dir():
        raise ValueError(f"--model: {model} is not a diffusers pipeline folder (no model_index.json)")
    elif family is None:
        try:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(model, "model_index.json", revision=revision)).read_text())
        except Exception as err:  # noqa: BLE001 - offline / unknown repo: ask for --family
            raise ValueError(
                f"--model: cannot read model_index.json of {model!r} ({type(err).__name__}); pass --family "
                f"({', '.join(FAMILIES)})"
            ) from None
    if index is not None:
        cls = index.get("_class_name")
        families = pipeline_families()
        found = families.get(cls)
        if found is None:
            raise ValueError(f"--model: pipeline class {cls!r} is not supported; expected one of {', '.join(families)}")
        if family is not None and family != found:
            raise ValueError(f"--family {family} contradicts {model}'s model_index.json ({cls} -> {found})")
        return found
    assert family is not None
    return family


def _device_and_dtype(opts: SampleOptions) -> tuple[torch.device, torch.dtype]:
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[name]


def load_transformer_override(family: str, path: str, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, get_adapter(family).transformer_class)
    sub = "transformer" if (Path(path) / "transformer" / "config.json").is_file() or not _looks_local(path) else None
    return cls.from_pretrained(path, subfolder=sub, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# timing and the dense-steps switch


class _StepClock:
    """Times each denoising step (first transformer call of the step -> callback_on_step_end) and flips the
    router to sparse after ``dense_steps`` steps."""

    def __init__(self, router: Any, dense_steps: int, device: torch.device, log: Callable[[str], None], total: int) -> None:
        self.router, self.dense_steps, self.device, self.log, self.total = router, dense_steps, device, log, total
        self.started: Optional[float] = None
        self.seconds: list[float] = []
        self.density: list[float] = []
        self.dense: list[bool] = []
        self._set_dense(0)

    def _set_dense(self, step: int) -> None:
        if self.router is not None and hasattr(self.router, "force_dense"):
            self.router.force_dense = step < self.dense_steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pre_forward(self, module: Any, args: Any) -> None:
        if self.started is None:
            self._sync()
            self.started = time.perf_counter()

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self._sync()
        now = time.perf_counter()
        elapsed = now - (self.started if self.started is not None else now)
        was_dense = step < self.dense_steps
        # straight from the router: a forced-dense step made no sparse call, so it reports 1.0 by itself
        density = 1.0 if self.router is None else float(self.router.density())
        self.seconds.append(elapsed)
        self.density.append(density)
        self.dense.append(was_dense)
        self.log(f"step {step + 1}/{self.total}: {elapsed:.3f} s, density {density:.3f}{' (dense step)' if was_dense else ''}")
        self.started = None
        self._set_dense(step + 1)
        return {}


# ----------------------------------------------------------------------------------------------------------------
# video file


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Pipeline output of one video -> uint8 [F, H, W, 3]: float arrays in [0, 1], uint8 arrays, tensors or PIL lists."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames: expected [F, H, W, 3], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def write_video(frames: Any, path: str | os.PathLike, fps: float = 16.0) -> Path:
    """Write one video (see :func:`to_uint8_frames`) as H.264 mp4 with PyAV, through a temp file and a rename."""
    from data.synthetic import write_mp4

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_mp4(path, to_uint8_frames(frames), fps)


# ----------------------------------------------------------------------------------------------------------------
# the whole run


def load_sampling_pipeline(opts: SampleOptions, adapter: Any, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> Any:
    """The adapter's pipeline with the fine-tuned weights in place (LoRA fused), on ``device``."""
    family = adapter.family
    transformer = load_transformer_override(family, opts.transformer, dtype) if opts.transformer else None
    pipe = adapter.load_pipeline(transformer=transformer)
    if opts.lora:
        log(f"loading LoRA {opts.lora}")
        load_lora(pipe, str(opts.lora), family, log)
        pipe.fuse_lora(components=["transformer"], lora_scale=opts.lora_scale)  # plain weights: no LoRA cost per step
        pipe.unload_lora_weights()
    if opts.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)  # the adapter loaded every component in its dtype (and kept fp32 where diffusers wants it)
    tiling = opts.vae_tiling if opts.vae_tiling is not None else device.type == "cuda"
    if tiling and hasattr(getattr(pipe, "vae", None), "enable_tiling"):
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# --lora


@dataclass
class LoraSource:
    """What ``load_lora_weights`` gets for a ``--lora`` argument, and the modules it must reach (None: unknown)."""

    weights: Any  # a diffusers-format state dict, a file path, or a Hub id / export folder
    kwargs: dict = field(default_factory=dict)
    modules: Optional[set[str]] = None  # transformer module names the LoRA holds
    note: Optional[str] = None


def _lora_modules(keys: Any, prefix: str = "transformer.") -> set[str]:
    return {k[len(prefix):].rsplit(".lora_", 1)[0] for k in keys if k.startswith(prefix) and ".lora_A." in k}


def _read_safetensors(path: Path, arg: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"--lora {arg}: {path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None


def lora_source(arg: str, family: str) -> LoraSource:
    """Resolve ``--lora`` (see :class:`SampleOptions`); a checkpoint of ours becomes a diffusers state dict with
    alpha/rank folded into lora_B, which is what the trained model computed."""
    from train.checkpointing import LORA_KEY as _LORA_KEY, load_lora_state, resolve_checkpoint

    path = Path(arg).expanduser()
    if not path.exists():
        if _looks_local(arg):
            raise UserError(f"--lora {arg} does not exist")
        return LoraSource(arg, {"weight_name": LORA_FILE})  # a Hub repo; see load_lora for other file names
    checkpoint_dir: Optional[Path] = None
    if path.is_dir():
        if (path / LORA_FILE).is_file():  # an export folder
            return lora_source(str(path / LORA_FILE), family)
        checkpoint_dir = path
    elif path.suffix != ".safetensors":
        raise UserError(f"--lora {arg}: expected a .safetensors file or a folder (export, run, final/ or checkpoint)")
    elif path.parent.name == "weights" and (path.parent.parent / "meta.json").is_file():
        checkpoint_dir = path.parent.parent  # <run>/final/weights/lora.safetensors: meta.json knows alpha
    if checkpoint_dir is not None:
        try:
            ckpt = resolve_checkpoint(checkpoint_dir)
        except (ValueError, FileNotFoundError) as err:
            detail = str(err).replace("--checkpoint: ", "")
            raise UserError(
                f"--lora {arg}: no LoRA found ({detail}); expected an export folder ({LORA_FILE}), a run folder, "
                "final/, a checkpoint folder or a .safetensors file"
            ) from None
        if ckpt.mode != "lora":
            raise UserError(f"--lora {arg} is a full fine-tune; export it (train/export.py) and pass --transformer <export>")
        if ckpt.family != family:
            raise UserError(f"--lora {arg} was trained for {ckpt.family}, but --model is a {family} pipeline")
        try:
            state = load_lora_state(ckpt)
        except ValueError as err:
            raise UserError(f"--lora {arg}: {err}") from None
        scale = float(ckpt.meta["lora"]["alpha"]) / float(ckpt.meta["lora"]["rank"])
        weights = {f"transformer.{k}": (v * scale if ".lora_B." in k else v) for k, v in state.items()}
        return LoraSource(weights, modules=_lora_modules(weights), note=f"LoRA of {ckpt.folder} (step {ckpt.meta.get('step')})")
    state = _read_safetensors(path, arg)
    if not state:
        raise UserError(f"--lora {arg}: the file holds no tensors")
    if all(_LORA_KEY.match(k) for k in state) and not any(k.startswith("transformer.") for k in state):
        weights = {f"transformer.{k}": v for k, v in state.items()}  # our peft keys, outside a checkpoint folder
        return LoraSource(weights, modules=_lora_modules(weights),
                          note="peft LoRA keys without a meta.json beside them: alpha is taken equal to the rank")
    modules = _lora_modules(state) if all(k.startswith("transformer.") for k in state) else None
    return LoraSource(str(path), modules=modules)


def load_lora(pipe: Any, arg: str, family: str, log: Callable[[str], None]) -> None:
    """Load ``--lora`` into ``pipe`` as adapter "sample"; raises UserError when it does not fit the transformer,
    so a LoRA that matched nothing can never render the base model silently."""
    from peft.tuners.lora import LoraLayer

    src = lora_source(arg, family)
    if src.note:
        log(src.note)
    if src.kwargs:  # a Hub repo: our file name first, then whatever diffusers finds there (files are cached)
        try:
            pipe.lora_state_dict(src.weights, **src.kwargs)
        except (OSError, ValueError) as ours:
            try:
                pipe.lora_state_dict(src.weights)
            except (OSError, ValueError):
                first = str(ours).strip().splitlines()[0] if str(ours).strip() else type(ours).__name__
                raise UserError(f"--lora {arg}: cannot load it from the Hub ({first[:300]})") from None
            src.kwargs = {}
    try:
        pipe.load_lora_weights(src.weights, adapter_name="sample", **src.kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if type(err).__name__ == "NoMatchingPeftModuleError" or "not found in the base model" in first:
            raise UserError(f"--lora {arg}: none of its LoRA modules is a layer of the {family} transformer "
                            "(a LoRA for another model family?)") from None
        raise UserError(f"--lora {arg} does not fit the {family} transformer: {first[:300]}") from None
    wrapped = {name for name, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer) and "sample" in m.lora_A}
    if not wrapped:
        raise UserError(f"--lora {arg}: no key matched a layer of the {family} transformer (a LoRA for another model?)")
    if src.modules is not None:
        missing = sorted(src.modules - wrapped)
        if missing:
            raise UserError(
                f"--lora {arg}: {len(missing)} of its {len(src.modules)} LoRA modules match no layer of the {family} "
                f"transformer (e.g. {', '.join(missing[:3])}): a LoRA for another model?"
            )
    log(f"LoRA applied to {len(wrapped)} layers")


def text_length_for(adapter: Any, pipe: Any) -> Optional[int]:
    """The prompt length the adapter trains with (sampling must match it), when the pipeline takes one."""
    if "max_sequence_length" not in inspect.signature(pipe.__call__).parameters:
        return None
    if callable(getattr(adapter, "text_length", None)) and getattr(pipe, "tokenizer", None) is not None:
        return int(adapter.text_length(pipe.tokenizer))
    value = getattr(adapter, "max_sequence_length", None)
    return value if isinstance(value, int) else None


@torch.no_grad()
def generate(opts: SampleOptions, log: Callable[[str], None] = print) -> SampleResult:
    """Generate ``opts.out``; logs the time and attention density of every step and a summary line."""
    check_options(opts)
    check_model_not_shadowed(opts.model, log)
    family = resolve_family(opts.model, opts.family, opts.revision)
    device, dtype = _device_and_dtype(opts)
    adapter = get_adapter(family)(opts.model, opts.revision, dtype)
    geometry = adapter.geometry(opts.frames, opts.height, opts.width)  # bad sizes fail before any weights load
    pipe = load_sampling_pipeline(opts, adapter, device, dtype, log)
    router = adapter.install_attention(pipe.transformer, opts.attention, geometry)
    clock = _StepClock(router, opts.dense_steps, device, log, opts.steps)
    hook = pipe.transformer.register_forward_pre_hook(clock.pre_forward)
    kwargs: dict[str, Any] = dict(
        prompt=opts.prompt,
        num_frames=opts.frames,
        height=opts.height,
        width=opts.width,
        num_inference_steps=opts.steps,
        generator=torch.Generator(device="cpu").manual_seed(opts.seed),
        output_type="np",
        callback_on_step_end=clock.on_step_end,
    )
    if opts.negative_prompt is not None:
        kwargs["negative_prompt"] = opts.negative_prompt
    if opts.guidance_scale is not None:
        kwargs["guidance_scale"] = opts.guidance_scale
    text_length = text_length_for(adapter, pipe)
    if text_length is not None:
        kwargs["max_sequence_length"] = text_length
    log(f"{family}: {opts.frames} frames {opts.height}x{opts.width}, {opts.steps} steps, {opts.attention.type} attention "
        f"(first {opts.dense_steps} steps and {opts.attention.dense_layers} layers dense) on {device}")
    start = time.perf_counter()
    try:
        output = pipe(**kwargs)
    finally:
        hook.remove()
    total = time.perf_counter() - start
    video = output.frames[0]
    path = write_video(video, opts.out, fps=opts.fps or adapter.default_fps)
    result = SampleResult(
        path=path,
        family=family,
        step_seconds=clock.seconds,
        step_density=clock.density,
        step_dense=clock.dense,
        num_frames=int(np.asarray(video).shape[0]) if not isinstance(video, list) else len(video),
        total_seconds=total,
    )
    log(f"mean time per step: {result.mean_step_seconds:.3f} s ({len(result.step_seconds)} steps, {total:.1f} s in all); "
        f"attention density: {result.sparse_density:.3f} (sparse steps, sparse layers)")
    log(f"wrote {path} ({result.num_frames} frames)")
    return result
