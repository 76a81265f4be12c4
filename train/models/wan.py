"""Wan2.1 (text-to-video) adapter over the diffusers classes.

Components: ``WanTransformer3DModel`` (40/30 blocks, patch (1, 2, 2)), ``AutoencoderKLWan`` (4x temporal,
8x spatial, 16 latent channels, per-channel ``latents_mean`` / ``latents_std``), ``UMT5EncoderModel`` with the
umt5-xxl tokenizer (512 text tokens), ``WanPipeline`` for sampling.

Flow matching (rectified flow, the convention of ``FlowMatchEulerDiscreteScheduler`` and of Wan's UniPC flow
scheduler): ``x_t = (1 - s) x0 + s noise``, target velocity ``noise - x0``, transformer timestep ``1000 s``.
Noise levels: ``u ~ U(0, 1)`` (or ``sigmoid(N(0, 1))`` with ``timestep_sampling="logit_normal"``), then the
same static shift the sampler applies to its grid, ``s = shift u / (1 + (shift - 1) u)``, shift 3.0 by default
(Wan's 480p text-to-video value; 720p samplers use 5.0). With uniform ``u`` the training noise levels have the
density of the sampler's shifted schedule, so training spends its steps where sampling evaluates the model.
Loss weighting is uniform (left to the trainer).

Positions for longer clips: Wan uses a 3-axis RoPE over integer (latent frame, row, column) indices from a table
of ``rope_max_seq_len`` (1024) positions per axis. Longer clips need no change to the model: latent frames past
the pre-training length (21 at 81 frames) simply take the next positions (extrapolation, as in the Radial
Attention Wan LoRA; no interpolation or NTK scaling). The hard limit is the table: at most 1024 latent frames
(4093 pixel frames) and 1024 patches per side (16384 pixels); :meth:`WanAdapter.geometry` rejects more.

Sparse attention: the self-attention ``attn1`` of every block (video tokens only, with Wan's QK-RMSNorm and RoPE)
goes through :class:`WanSparseAttnProcessor` and the shared :class:`~train.attention.AttentionRouter`; the text
cross-attention ``attn2`` keeps diffusers' stock processor (dense).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from train.models import common
from train.geometry import VideoGeometry

__all__ = ["WanAdapter", "WanEncoders", "WanSparseAttnProcessor", "TINY_TRANSFORMER_CONFIG"]

#: Text length of the real Wan2.1 text encoder input (WanPipeline's max_sequence_length default).
WAN_TEXT_TOKENS = 512
#: Default static timestep shift for training (Wan2.1 480p text-to-video).
WAN_DEFAULT_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000

TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,  # == the tiny text encoder's d_model (train.tiny.text_encoders.TINY_T5_SIZES)
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=1024,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    # Not 0 / 1, so that tests see the normalisation at work.
    latents_mean=[0.1, -0.2, 0.3, -0.05],
    latents_std=[1.5, 0.8, 1.2, 2.0],
)
TINY_TEXT_TOKENS = WAN_TEXT_TOKENS  # as the real model: pipelines default to 512, so sampling matches training


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on [B, N, H, D]: pairs (x[2i], x[2i+1]) rotate by the angle of cos/sin[2i]."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


class WanSparseAttnProcessor(common.RouterAttnProcessor):
    """Diffusers attention processor for Wan's self-attention (``attn1``) that routes through the router.

    It does what diffusers' ``WanAttnProcessor`` does for self-attention - q/k/v projections (fused or not,
    LoRA-wrapped or not), RMSNorm across heads on q and k, Wan's RoPE - and hands ``[B, H, N, D]`` to the
    router instead of ``dispatch_attention_fn``; with a dense router the output is bit-identical to stock.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("WanSparseAttnProcessor is for self-attention (attn1); attn2 keeps the stock processor")
        if attention_mask is not None:
            raise ValueError("WanSparseAttnProcessor: Wan's self-attention takes no attention_mask")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, N, H, D]
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = self.attend(q, k, v, layout="bnhd")  # [B, N, H, D] in and out: no transpose copies
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class WanEncoders:
    """Frozen conditioning models (what :meth:`WanAdapter.load_encoders` returns)."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    max_sequence_length: int


class WanAdapter(common.DiffusersAdapter):
    """Wan2.1 / Wan2.2-style single-transformer text-to-video models in diffusers format."""

    family = "wan"
    display_name = "Wan"
    release_name = "Wan2.1"
    default_fps = 16.0
    frame_multiple = 4
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    transformer_marker = "blocks"
    radial_rule = "wan"
    router_processor = WanSparseAttnProcessor
    stock_processor = "diffusers.models.transformers.transformer_wan:WanAttnProcessor"

    def __init__(
        self,
        pretrained: str,
        revision: Optional[str] = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        shift: Optional[float] = None,
        timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
        max_sequence_length: Optional[int] = None,
        vae_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(pretrained, revision, dtype)
        if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
            raise ValueError(f"model.pretrained must be a Hub id or a local diffusers folder, got {pretrained!r}")
        self.pretrained = str(pretrained)
        self.shift = WAN_DEFAULT_SHIFT if shift is None else float(shift)
        if not self.shift > 0:
            raise ValueError(f"train.timestep_shift must be > 0, got {shift!r}")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        self.timestep_sampling = timestep_sampling
        if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        self._max_sequence_length = max_sequence_length
        self.vae_dtype = vae_dtype

    # -- configs --------------------------------------------------------------------------------------
    def configs(self) -> tuple[dict, dict]:
        """(transformer config, VAE config) of ``pretrained``, checked to be Wan's; read once (JSON only)."""
        transformer = self._config("transformer")
        if transformer.get("_class_name") != "WanTransformer3DModel":
            raise ValueError(
                f"model.pretrained {self.pretrained!r}: transformer is {transformer.get('_class_name')!r}, "
                "expected 'WanTransformer3DModel' for model.family 'wan'"
            )
        return transformer, self._config("vae")

    def _check_pretrained(self) -> None:  # the transformer class too, not only model_index.json
        self.configs()

    def _factors(self) -> tuple[int, int, tuple[int, int, int], int]:
        transformer, vae = self.configs()
        temporal = int(vae.get("scale_factor_temporal") or 4)
        spatial = int(vae.get("scale_factor_spatial") or 8)
        patch = tuple(int(p) for p in transformer.get("patch_size", (1, 2, 2)))
        rope = int(transformer.get("rope_max_seq_len", 1024))
        return temporal, spatial, patch, rope  # type: ignore[return-value]

    # -- shapes ---------------------------------------------------------------------------------------
    def geometry(self, frames: int, height: int, width: int) -> VideoGeometry:
        for name, value in (("frames", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        t, s, (p_t, p_h, p_w), rope = self._factors()
        if p_t != 1:
            raise ValueError(f"Wan transformers with a temporal patch of {p_t} are not supported (expected 1)")
        if (frames - 1) % t:
            low = (frames - 1) // t * t + 1
            raise ValueError(
                f"frames={frames} is not of the form {t}k+1 that the Wan VAE needs; nearest valid: "
                f"{low} or {low + t}"
            )
        for name, value, patch in (("height", height, p_h), ("width", width, p_w)):
            multiple = s * patch
            if value % multiple:
                low = value // multiple * multiple
                options = f"{low} or {low + multiple}" if low else f"{multiple}"
                raise ValueError(
                    f"{name}={value} is not divisible by {multiple} (VAE factor {s} x patch {patch}); "
                    f"nearest valid: {options}"
                )
        latent_frames = (frames - 1) // t + 1
        lh, lw = height // s, width // s
        if latent_frames > rope:
            raise ValueError(
                f"frames={frames} gives {latent_frames} latent frames, more than the {rope} positions of Wan's "
                f"RoPE table (rope_max_seq_len); at most {(rope - 1) * t + 1} frames"
            )
        for name, value, patch in (("height", lh, p_h), ("width", lw, p_w)):
            if value // patch > rope:
                raise ValueError(
                    f"{name} gives {value // patch} patches, more than the {rope} positions of Wan's RoPE table"
                )
        return VideoGeometry(
            frames=frames,
            height=height,
            width=width,
            latent_frames=latent_frames,
            latent_height=lh,
            latent_width=lw,
            tokens_per_frame=(lh // p_h) * (lw // p_w),
        )

    def geometry_from_latents(self, shape: tuple[int, ...] | torch.Size) -> VideoGeometry:
        """Geometry of latents ``[B, C, T, h, w]`` (what the transformer sees)."""
        if len(shape) != 5:
            raise ValueError(f"latents must be [B, C, T, h, w], got shape {tuple(shape)}")
        t, s, (_, p_h, p_w), _ = self._factors()
        _, _, lt, lh, lw = (int(x) for x in shape)
        return VideoGeometry(
            frames=(lt - 1) * t + 1,
            height=lh * s,
            width=lw * s,
            latent_frames=lt,
            latent_height=lh,
            latent_width=lw,
            tokens_per_frame=(lh // p_h) * (lw // p_w),
        )

    # -- loading --------------------------------------------------------------------------------------
    def load_encoders(self, device: torch.device) -> WanEncoders:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.configs()
        vae = AutoencoderKLWan.from_pretrained(
            self.pretrained, subfolder="vae", revision=self.revision, **common.dtype_kwarg(self.vae_dtype)
        )
        text_encoder = UMT5EncoderModel.from_pretrained(
            self.pretrained, subfolder="text_encoder", revision=self.revision, dtype=self.dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(self.pretrained, subfolder="tokenizer", revision=self.revision)
        for module in (vae, text_encoder):
            module.requires_grad_(False).eval().to(device)
        return WanEncoders(vae, text_encoder, tokenizer, self.text_length(tokenizer))

    def text_length(self, tokenizer: Any) -> int:
        """Text tokens per prompt: the constructor's value, else min(512, tokenizer.model_max_length).

        Training and sampling must use the same length (Wan attends to the zero-padded embeddings too), so pass
        it to the pipeline as ``max_sequence_length``.
        """
        if self._max_sequence_length is not None:
            return self._max_sequence_length
        return int(min(WAN_TEXT_TOKENS, getattr(tokenizer, "model_max_length", WAN_TEXT_TOKENS)))

    def load_pipeline(self, transformer: Optional[nn.Module] = None, encoders: Optional[WanEncoders] = None) -> Any:
        """``WanPipeline`` from ``pretrained`` (its own scheduler); reuses ``transformer`` / ``encoders`` if given."""
        self.configs()
        parts: dict[str, Any] = {}
        if transformer is not None:
            parts["transformer"] = common.unwrap(transformer)
        if encoders is not None:
            parts.update(vae=encoders.vae, text_encoder=encoders.text_encoder, tokenizer=encoders.tokenizer)
        else:
            from diffusers import AutoencoderKLWan

            parts["vae"] = AutoencoderKLWan.from_pretrained(
                self.pretrained, subfolder="vae", revision=self.revision, **common.dtype_kwarg(self.vae_dtype)
            )
        return self._pipeline(**parts)

    # -- conditioning ---------------------------------------------------------------------------------
    @torch.no_grad()  # the encoders are frozen: never build a graph through them
    def encode_videos(self, encoders: WanEncoders, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, F, H, W] in [-1, 1], got {getattr(pixels, 'shape', type(pixels))}")
        _, _, f, h, w = pixels.shape
        self.geometry(int(f), int(h), int(w))
        vae = encoders.vae
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
        # Inverse of WanPipeline's decode (latents / (1 / std) + mean), as the original Wan VAE wrapper scales.
        shape, like = (1, vae.config.z_dim, 1, 1, 1), dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(vae.config.latents_mean, **like).view(shape)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, **like).view(shape)
        return ((latents - mean) * inv_std).float()

    @torch.no_grad()
    def encode_prompts(self, encoders: WanEncoders, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": [B, L, C]}`` exactly as ``WanPipeline.encode_prompt`` builds it
        (cleaned text, UMT5 states of the real tokens, zeros after them, L = max_sequence_length)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts must be a non-empty list of str, got {type(prompts).__name__}")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str")
        length = encoders.max_sequence_length
        tokens = encoders.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(encoders.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = encoders.text_encoder(ids, mask).last_hidden_state
        states = states * mask.gt(0).unsqueeze(-1).to(states.dtype)  # zero after each prompt's own tokens
        return {"encoder_hidden_states": states}

    # -- flow matching --------------------------------------------------------------------------------
    def sample_sigmas(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        gen_device = generator.device if generator is not None else device
        if self.timestep_sampling == "uniform":
            u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
        else:
            u = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float64).sigmoid()
        u = u.clamp(1e-5, 1.0 - 1e-5)
        sigmas = self.shift * u / (1.0 + (self.shift - 1.0) * u)
        return sigmas.float().to(device)

    def training_pair(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if latents.shape != noise.shape or latents.dim() != 5:
            raise ValueError(
                f"latents and noise must be equal [B, C, T, h, w], got {tuple(latents.shape)} and {tuple(noise.shape)}"
            )
        if sigmas.dim() != 1 or sigmas.shape[0] != latents.shape[0]:
            raise ValueError(f"sigmas must be [B] = [{latents.shape[0]}], got {tuple(sigmas.shape)}")
        s = sigmas.to(latents.device, torch.float32).view(-1, 1, 1, 1, 1)
        x0, eps = latents.float(), noise.float()
        noisy = (1.0 - s) * x0 + s * eps
        return noisy, sigmas.to(latents.device, torch.float32) * NUM_TRAIN_TIMESTEPS, eps - x0

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity prediction, float32, shaped like ``noisy``. Inputs are cast to the transformer's dtype like
        WanPipeline does; ``transformer`` may be wrapped (DDP / DeepSpeed) and is called as is."""
        if "encoder_hidden_states" not in cond:
            raise KeyError("cond must hold 'encoder_hidden_states' (from encode_prompts)")
        dtype = common.unwrap(transformer).patch_embedding.weight.dtype
        out = transformer(
            hidden_states=noisy.to(dtype),
            timestep=timesteps.float(),
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    # -- attention ------------------------------------------------------------------------------------
    def _routed_attentions(self, model: nn.Module) -> list[nn.Module]:
        """Every block's self-attention ``attn1``; the text cross-attention ``attn2`` keeps the stock (dense)
        processor."""
        return [block.attn1 for block in model.blocks]

    # -- sequence parallelism -------------------------------------------------------------------------
    def sequence_parallel_hooks(self, transformer: nn.Module, sp: Any, heads: int) -> list[Any]:
        """Tokens sharded entering the first block, rotary tables [1, N, 1, D] with them, gathered after
        ``proj_out``; the text cross-attention works per video token on the local shard."""
        from train.sequence_parallel import gather_hook, rope_hook, shard_video

        def shard_tokens(_module: Any, args: tuple) -> tuple:
            return (shard_video(sp, args[0], heads), *args[1:])

        return [
            transformer.rope.register_forward_hook(rope_hook(sp, 1)),  # rotary tables [1, N, 1, D]
            transformer.blocks[0].register_forward_pre_hook(shard_tokens),
            transformer.proj_out.register_forward_hook(gather_hook(sp)),
        ]

    # -- tiny models ----------------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls) -> Any:
        """A tiny random-weight ``WanPipeline`` (about 70k parameters, 0.4 MB), built fully offline."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        from train.tiny.t5_tokenizer import tiny_t5_tokenizer
        from train.tiny.text_encoders import tiny_t5_encoder

        tokenizer = tiny_t5_tokenizer(model_max_length=TINY_TEXT_TOKENS)
        text_encoder = tiny_t5_encoder(UMT5EncoderModel, tokenizer)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=WAN_DEFAULT_SHIFT),
            transformer=transformer,
        )

    # -- export ---------------------------------------------------------------------------------------
    def comfyui_key(self, diffusers_module: str) -> Optional[str]:
        """Original Wan (ComfyUI) module name, e.g. ``blocks.3.attn1.to_q`` -> ``blocks.3.self_attn.q``.

        The name carries no ``diffusion_model.`` prefix (the exporter adds it); a leading ``transformer.`` is
        accepted. None for modules the original checkpoint does not have.
        """
        name = diffusers_module.removeprefix("transformer.")
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
            inner = _COMFY_BLOCK.get(".".join(parts[2:]))
            return None if inner is None else f"blocks.{parts[1]}.{inner}"
        return _COMFY_TOP.get(name)


# Diffusers -> original names inside one block (inverse of diffusers' Wan converters).
_COMFY_BLOCK: dict[str, str] = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))},
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm2": "norm3",  # diffusers' cross-attention norm is the original norm3 and vice versa
    "norm3": "norm2",
}
_COMFY_TOP: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
