"""What the family adapters share: input checks, geometry, config reading, the router step hook, and two
adapter bases keyed by class attributes - :class:`DiffusersAdapter` (every family: config reading, transformer
loading, router processors) and :class:`PipelineAdapter` (HunyuanVideo and Mochi:
one constructor, geometry, noise levels and pipeline loading). Family knowledge stays in the adapter files."""

from __future__ import annotations

import os
import weakref
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from train.geometry import VideoGeometry
from train.lazy import import_object
from train.models.base import ModelAdapter


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": d}`` where diffusers takes it (0.36+), ``{"torch_dtype": d}`` on older versions."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def diffusers_class(name: str) -> Any:
    """A diffusers class by name, imported on use (importing an adapter module stays cheap)."""
    import diffusers

    return getattr(diffusers, name)


def unwrap(model: nn.Module) -> nn.Module:
    """The diffusers model inside DDP / DeepSpeed / torch.compile wrappers (for its config and blocks)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _nearest(value: int, multiple: int, offset: int = 0) -> str:
    lo = (value - offset) // multiple * multiple + offset
    return " or ".join(str(v) for v in (lo, lo + multiple) if v >= max(offset, 1))


def video_geometry(
    frames: int, height: int, width: int, *, t_factor: int, s_factor: int, patch: int, family: str
) -> VideoGeometry:
    """Token layout of a clip; ValueError naming frames/height/width and the nearest valid values."""
    for arg, value in (("frames", frames), ("height", height), ("width", width)):
        check_int(arg, value)
    if frames < 1 or (frames - 1) % t_factor:
        raise ValueError(
            f"frames must be of the form {t_factor}k+1 for {family} (VAE temporal factor {t_factor}), got {frames}; "
            f"nearest valid: {_nearest(max(frames, 1), t_factor, 1)}"
        )
    multiple = s_factor * patch
    for arg, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise ValueError(
                f"{arg} must be a positive multiple of {multiple} for {family} (VAE factor {s_factor} x patch "
                f"{patch}), got {value}; nearest valid: {_nearest(max(value, multiple), multiple)}"
            )
    lh, lw = height // s_factor, width // s_factor
    return VideoGeometry(
        frames=frames,
        height=height,
        width=width,
        latent_frames=(frames - 1) // t_factor + 1,
        latent_height=lh,
        latent_width=lw,
        tokens_per_frame=(lh // patch) * (lw // patch),
    )


def is_local_path(pretrained: str) -> bool:
    """A folder path rather than a Hub id (``name`` or ``org/name``)."""
    return (
        os.path.exists(os.path.expanduser(pretrained))
        or pretrained.startswith((".", "/", "~"))
        or pretrained.count("/") > 1
        or "\\" in pretrained
    )


def read_model_index(pretrained: Any, revision: Optional[str], expected: str) -> dict:
    """model_index.json of ``pretrained`` (local folder or Hub id), checked to hold an ``expected`` pipeline."""
    from diffusers import DiffusionPipeline

    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained).strip():
        raise ValueError("model.pretrained is empty: give a Hub id (org/name) or a local diffusers pipeline folder")
    pretrained = str(pretrained)
    if is_local_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_dir():
            raise ValueError(f"model.pretrained: folder {pretrained!r} does not exist")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model.pretrained: {pretrained!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as err:  # noqa: BLE001 - hub / network / json errors all mean the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"model.pretrained: cannot read model_index.json of {pretrained!r} (revision {revision!r}; a wrong id, "
            f"or offline without a cached copy?): {type(err).__name__}: {first}"
        ) from err
    found = index.get("_class_name")
    if found != expected:
        from train.models import pipeline_families

        family = pipeline_families().get(found)
        hint = f" of family {family!r} (set model.family: {family})" if family else ""
        raise ValueError(f"model.pretrained: {pretrained!r} holds a {found!r} pipeline{hint}, not a {expected}")
    return dict(index)


def read_component_config(cls: Any, pretrained: str, subfolder: str, revision: Optional[str]) -> dict:
    try:
        return dict(cls.load_config(pretrained, subfolder=subfolder, revision=revision))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"model.pretrained: cannot read {subfolder}/config.json of {pretrained!r}: {err}") from err


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_timestep_sampling(sampling: str) -> str:
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"train.timestep_sampling must be one of {list(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
    return sampling


def sample_noise_levels(
    batch: int, shift: float, sampling: str, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """u ~ U(0, 1) ("uniform") or sigmoid(N(0, 1)) ("logit_normal"), then the flow-matching shift
    s = shift*u / (1 + (shift-1)*u), kept inside (0, 1)."""
    check_int("batch", batch)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    check_timestep_sampling(sampling)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if sampling == "uniform":
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32)
    else:
        u = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32).sigmoid()
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    return sigma.clamp(1e-4, 1.0 - 1e-4).to(device)


def check_shift(shift: Optional[float], default: float) -> float:
    if shift is None:
        return default
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"train.timestep_shift must be a number > 0, got {shift!r}")
    return float(shift)


def broadcast_sigmas(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigmas [B] as [B, 1, 1, 1, 1] float32, after checking the shapes of a training pair."""
    if latents.shape != noise.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if sigmas.dim() != 1 or sigmas.shape[0] != latents.shape[0]:
        raise ValueError(f"sigmas must be [B] = [{latents.shape[0]}], got {tuple(sigmas.shape)}")
    return sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1-s) x0 + s noise in the latents' dtype (the straight flow-matching path), shapes checked."""
    s = broadcast_sigmas(latents, noise, sigmas)
    return ((1.0 - s) * latents + s * noise).to(latents.dtype)


# -- attention processors ------------------------------------------------------------------------------------


class RouterAttnProcessor:
    """Base of the families' router processors: the shared router and the block's layer index (by which the
    router keeps per-layer state and dense layers)."""

    def __init__(self, router: Any, layer_idx: int) -> None:
        self.router = router
        self.layer_idx = layer_idx

    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``router(layer_idx, q, k, v, **kwargs)`` outside any compiled region: in a compiled block this is the
        one graph break (the router's mask cache, step counting and SVG2 state stay eager Python, and the
        layer index never becomes a guard, so one compiled graph serves every block; train/step_speed.py)."""
        return self.router(self.layer_idx, q, k, v, **kwargs)


def project_heads(
    attn: nn.Module, x: torch.Tensor, projections: tuple[nn.Module, ...], norms: tuple[Optional[nn.Module], ...]
) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``x`` as [B, N, heads, D] by three projections, then q and k through their (per-head) norms
    where the attention module has them: the stock order of the HunyuanVideo and Mochi processors."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    norm_q, norm_k = norms
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def set_processor(attn: nn.Module, processor: Any) -> None:
    """``attn.set_processor`` where the module has it (diffusers ``Attention``); ``MochiAttention`` has none and
    its forward reads ``attn.processor``, so there it is assigned."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


# -- router step hook ----------------------------------------------------------------------------------------

_HOOKS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


class StepHook:
    """Forward pre-hook: one router step per transformer forward, the router's geometry taken from the latents
    (``[B, C, T, H, W]``), so buckets and validation sizes need no extra call."""

    def __init__(self, router: Any, from_latents: Callable[[tuple[int, ...]], VideoGeometry]) -> None:
        self.router, self.from_latents = router, from_latents

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 5:
            g = self.router.geometry
            if (g.latent_frames, g.latent_height, g.latent_width) != tuple(hidden.shape[2:]):
                self.router.set_geometry(self.from_latents(tuple(hidden.shape)))
        self.router.begin_step()


def set_step_hook(model: nn.Module, hook: Optional[StepHook]) -> None:
    """Replace ``model``'s step hook by ``hook`` (None: just remove it)."""
    old = _HOOKS.pop(model, None)
    if old is not None:
        old.remove()
    if hook is not None:
        _HOOKS[model] = model.register_forward_pre_hook(hook, with_kwargs=True)


# -- argument checks -----------------------------------------------------------------------------------------


def check_pixels(pixels: Any) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be a [B, 3, F, H, W] tensor in [-1, 1], got {getattr(pixels, 'shape', type(pixels))}")


def check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty")
    return list(prompts)


def check_cond(cond: Any, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(cond, dict) or k not in cond]
    if missing:
        raise ValueError(f"cond is missing {missing}; pass what encode_prompts returned")


# -- adapter bases -------------------------------------------------------------------------------------------


class DiffusersAdapter(ModelAdapter):
    """What every diffusers family does alike, keyed by its class attributes: reading ``model_index.json`` and
    the transformer / VAE configs of ``pretrained`` (once, checked), loading the transformer, and routing the
    video attention through the family's router processor (and back to stock).

    Installing attention also registers a forward pre-hook that starts a router step per transformer forward
    and keeps the router's geometry equal to the latents actually passed in (buckets, validation at another
    size), so neither the trainer nor the pipelines call ``begin_step``. Installing again replaces the router.
    """

    #: diffusers class of the ``vae`` (the pipeline and transformer classes are declared by ModelAdapter).
    vae_class: ClassVar[str]
    #: An attribute only that transformer has, checked before processors are installed.
    transformer_marker: ClassVar[str]
    #: Class names of the repeated blocks regional compilation compiles when the diffusers class declares no
    #: ``_repeated_blocks`` (train/step_speed.py).
    repeated_blocks: ClassVar[tuple[str, ...]] = ()
    #: The family's processor, and the stock diffusers processor (``"module:Class"``) it replaces.
    router_processor: ClassVar[type[RouterAttnProcessor]]
    stock_processor: ClassVar[str]

    def __init__(self, pretrained: str, revision: Optional[str] = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(pretrained, revision, dtype)
        self._index: Optional[dict] = None
        self._configs: dict[str, dict] = {}

    # -- configs ---------------------------------------------------------------------------------------------
    def model_index(self) -> dict:
        """model_index.json of ``pretrained``, checked to hold the family's pipeline; read once."""
        if self._index is None:
            self._index = read_model_index(self.pretrained, self.revision, self.pipeline_class)
        return self._index

    def _config(self, subfolder: str) -> dict:
        """config.json of the ``transformer`` or ``vae`` subfolder (after the model_index check); read once."""
        if subfolder not in self._configs:
            self.model_index()
            cls = diffusers_class(self.transformer_class if subfolder == "transformer" else self.vae_class)
            self._configs[subfolder] = read_component_config(cls, self.pretrained, subfolder, self.revision)
        return self._configs[subfolder]

    def _check_pretrained(self) -> None:
        """Raise the ValueError naming model.pretrained before anything is loaded from it."""
        self.model_index()

    # -- shapes and loading ----------------------------------------------------------------------------------
    @abstractmethod
    def geometry_from_latents(self, shape: tuple[int, ...]) -> VideoGeometry:
        """Geometry of latents ``[B, C, T, h, w]`` (the router follows it from forward to forward)."""

    def load_transformer(self) -> nn.Module:
        self._check_pretrained()
        return diffusers_class(self.transformer_class).from_pretrained(
            self.pretrained, subfolder="transformer", revision=self.revision, **dtype_kwarg(self.dtype)
        )

    def _pipeline(self, **components: Any) -> Any:
        """The family's pipeline from ``pretrained`` in ``dtype``; ``components`` replace the stored ones."""
        self._check_pretrained()
        return diffusers_class(self.pipeline_class).from_pretrained(
            self.pretrained, revision=self.revision, **dtype_kwarg(self.dtype), **components
        )

    # -- attention -------------------------------------------------------------------------------------------
    @abstractmethod
    def _routed_attentions(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules that get the router processor, in ``layer_idx`` order."""

    def install_attention(self, transformer: nn.Module, attention: Any, geometry: VideoGeometry) -> Any:
        """The family's router processor on every routed attention module; returns the ``AttentionRouter``."""
        from train.attention import AttentionRouter

        model = unwrap(transformer)
        if not hasattr(model, self.transformer_marker):
            raise TypeError(f"expected a {self.transformer_class}, got {type(model).__name__}")
        router = AttentionRouter(attention, geometry, radial_rule=self.radial_rule)
        for idx, attn in enumerate(self._routed_attentions(model)):
            set_processor(attn, self.router_processor(router, idx))
        set_step_hook(model, StepHook(router, self.geometry_from_latents))
        return router

    def remove_attention(self, transformer: nn.Module) -> None:
        """Back to diffusers' stock processors; drops the step hook."""
        stock = import_object(self.stock_processor)
        model = unwrap(transformer)
        set_step_hook(model, None)
        for attn in self._routed_attentions(model):
            if isinstance(attn.processor, self.router_processor):
                set_processor(attn, stock())


class PipelineAdapter(DiffusersAdapter):
    """HunyuanVideo and Mochi: the same constructor (checked ``train.timestep_shift`` / ``timestep_sampling``),
    geometry from the VAE and patch factors, shifted noise levels, and the encoders and sampler loaded through
    the family's pipeline class (so classes and dtypes are exactly the pipeline's)."""

    #: ``train.timestep_shift`` when none is given.
    default_shift: ClassVar[float]
    #: Pipeline components the family's encoders object holds under the same names (VAE, text encoders,
    #: tokenizers); load_pipeline hands them back to the pipeline.
    encoder_components: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        pretrained: str,
        revision: Optional[str] = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        shift: Optional[float] = None,
        timestep_sampling: str = "uniform",
    ) -> None:
        super().__init__(pretrained, revision, dtype)
        #: Timestep shift of the training noise levels (``train.timestep_shift``; default ``default_shift``).
        self.shift = check_shift(shift, self.default_shift)
        #: Distribution of u before the shift (``train.timestep_sampling``): "uniform" or "logit_normal".
        self.timestep_sampling = check_timestep_sampling(timestep_sampling)

    # -- shapes ----------------------------------------------------------------------------------------------
    @abstractmethod
    def _factors(self) -> tuple[int, int, int]:
        """(VAE temporal, VAE spatial, patch) from the configs."""

    def geometry(self, frames: int, height: int, width: int) -> VideoGeometry:
        t_factor, s_factor, patch = self._factors()
        return video_geometry(
            frames, height, width, t_factor=t_factor, s_factor=s_factor, patch=patch, family=self.display_name
        )

    def geometry_from_latents(self, shape: tuple[int, ...]) -> VideoGeometry:
        """Geometry of latents ``[B, C, T, h, w]`` (the pixel sizes they decode to)."""
        t_factor, s_factor, _ = self._factors()
        t, h, w = (int(x) for x in shape[-3:])
        return self.geometry((t - 1) * t_factor + 1, h * s_factor, w * s_factor)

    # -- loading ---------------------------------------------------------------------------------------------
    def load_pipeline(self, transformer: Optional[nn.Module] = None, encoders: Any = None) -> Any:
        """The family's pipeline of ``pretrained``; ``transformer`` / ``encoders`` replace the stored ones (the
        trainer's live weights, and encoders already in memory instead of a second copy of the text encoders)."""
        components: dict[str, Any] = {}
        if transformer is not None:
            components["transformer"] = unwrap(transformer)
        if encoders is not None:
            components.update({name: getattr(encoders, name) for name in self.encoder_components})
        return self._pipeline(**components)

    def _encoder_pipeline(self, device: torch.device) -> Any:
        """The pipeline without its transformer, VAE and text encoders frozen on ``device``, VAE tiling on (long
        clips would not fit otherwise)."""
        pipe = self._pipeline(transformer=None)
        for name in self.encoder_components:
            part = getattr(pipe, name)
            if isinstance(part, nn.Module):
                part.to(device).eval().requires_grad_(False)
        pipe.vae.enable_tiling()
        return pipe

    # -- flow matching ---------------------------------------------------------------------------------------
    def sample_sigmas(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        """u ~ U(0, 1) (or sigmoid(N(0, 1)) with ``timestep_sampling="logit_normal"``) through the shift
        ``s = shift*u / (1 + (shift-1)*u)``; ``default_shift`` unless configured (the family module says why)."""
        return sample_noise_levels(batch, self.shift, self.timestep_sampling, generator, torch.device(device))
