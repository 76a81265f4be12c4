"""Mochi 1 (diffusers ``MochiTransformer3DModel`` + ``AutoencoderKLMochi`` + T5-XXL).

What this family needs, and the choices made here:

* **Frames and tokens.** The VAE compresses time by 6 and space by 8 (products of its ``temporal_expansions``
  and ``spatial_expansions``), so pixel frame counts are ``6k+1`` (163 for the released model: 28 latent
  frames); the transformer patchifies 2x2 per latent frame, so height and width must be multiples of 16 and
  one latent frame is ``(H/16)*(W/16)`` tokens (480x848: 30*53 = 1590).
* **Latents.** ``encode_videos`` returns ``(mean_z - latents_mean) / latents_std * scaling_factor`` per
  channel, the exact inverse of what ``MochiPipeline`` applies before decoding
  (``latents * latents_std / scaling_factor + latents_mean``); only ``* scaling_factor`` when the VAE config
  has no statistics (the pipeline's other branch).
* **Text.** As the pipeline: T5 embeddings of the prompt padded to ``max_sequence_length`` (256) with its boolean
  attention mask; an empty prompt gets zero ids and an all-False mask when the pipeline folder sets
  ``force_zeros_for_empty_prompt`` (applied per prompt here, the pipeline tests only the last one).
* **Flow matching.** Mochi runs time backwards: ``MochiPipeline`` hands its noise-level schedule s (1 -> 0) to a
  ``FlowMatchEulerDiscreteScheduler`` with ``invert_sigmas=True``, which steps ``x += (c' - c) * v`` over the
  inverted levels ``c = 1 - s`` (0 -> 1) and passes the transformer ``t = 1000 (1 - s)``. So the model predicts
  ``v = x0 - noise`` and is conditioned on ``1000 (1 - s)`` (Genmo's original trainer does the same). Training
  uses that pair: ``x_s = (1-s) x0 + s noise``, timestep ``1000 (1 - s)``, target ``x0 - noise``. Noise levels
  are uniform in (0, 1) as in Genmo's fine-tuner (shift 1.0; ``train.timestep_shift`` applies the usual
  ``s = shift*u / (1 + (shift-1)*u)``, ``train.timestep_sampling: logit_normal`` draws u from
  sigmoid(N(0, 1))). :meth:`MochiAdapter.load_pipeline` refuses a scheduler without ``invert_sigmas``
  (sampling would then not match training).
* **Positions for longer clips.** Mochi's RoPE has *learned* frequencies (``pos_frequencies``, 3 x heads x
  head_dim/2) applied to positions computed in every forward: time ``t = 0, 1, ...`` (unscaled) and centred
  space coordinates rescaled to a 192x192 reference area. There is no table or length limit: 2x / 4x clips
  (55 / 109 latent frames instead of 28) simply use larger temporal positions, which the learned temporal
  frequencies extrapolate to; the fine-tune adapts them. Limits are memory and compute only.
* **Attention.** Each block's ``MochiAttention`` (video and text projected separately with QK RMS-norms, RoPE
  on the video part, one joint attention) gets :class:`MochiRouterAttnProcessor`. ``MochiAttention`` has no
  ``set_processor`` and the model no ``set_attn_processor``, so ``module.processor`` is assigned. The joint
  attention goes through the ``AttentionRouter``: video tokens first, text after, text dense both ways, padded
  text keys masked out; the outputs are laid out as the stock processor leaves them (rows of padded text
  tokens zero). The attention pooling of the caption embedding stays stock.
* **ComfyUI names.** Mochi has no established ComfyUI LoRA naming (ComfyUI's Mochi loader and the LoRA tools
  around it agree on none), so :meth:`MochiAdapter.comfyui_key` returns None and only the diffusers LoRA format
  is exported (``MochiPipeline.load_lora_weights`` reads it natively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from train.models import common

__all__ = ["MochiAdapter", "MochiEncoders", "MochiRouterAttnProcessor"]


# ----------------------------------------------------------------------------------------------------------------
# attention processor


def _mochi_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's interleaved RoPE on [B, N, H, D] with per-head cos/sin [N, H, D/2], in float32 (as stock)."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rot_even = (even * cos - odd * sin).to(x.dtype)
    rot_odd = (even * sin + odd * cos).to(x.dtype)
    return torch.stack([rot_even, rot_odd], dim=-1).flatten(-2)


class MochiRouterAttnProcessor(common.RouterAttnProcessor):
    """``MochiAttnProcessor2_0`` with its joint attention routed through an ``AttentionRouter``.

    Stock Mochi runs one SDPA per sample over the video tokens and that sample's valid text tokens, and writes
    the valid text outputs first, then zeros. Here the whole batch goes to the router at once with a key padding
    mask; the text rows are then put in the stock layout (valid rows in order, zero rows after), so with a dense
    router the block outputs are the stock ones.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = common.project_heads(
            attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        )
        enc_q, enc_k, enc_v = common.project_heads(
            attn,
            encoder_hidden_states,
            (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
            (attn.norm_added_q, attn.norm_added_k),
        )
        if image_rotary_emb is not None:  # video tokens only
            query = _mochi_rope(query, *image_rotary_emb)
            key = _mochi_rope(key, *image_rotary_emb)

        batch, n_video, n_text = query.shape[0], query.shape[1], enc_q.shape[1]
        text_valid = _text_mask(attention_mask, batch, n_text, query.device)
        key_padding = torch.cat([text_valid.new_ones(batch, n_video), text_valid], dim=1)
        out = self.attend(
            torch.cat([query, enc_q], dim=1).transpose(1, 2),
            torch.cat([key, enc_k], dim=1).transpose(1, 2),
            torch.cat([value, enc_v], dim=1).transpose(1, 2),
            text_tokens=n_text,
            key_padding_mask=key_padding,
        ).transpose(1, 2)  # [B, N, H, D]

        video_out, text_out = out[:, :n_video], out[:, n_video:]
        # Stock layout of the text rows: outputs of the valid tokens in their order, then zero rows.
        text_out = text_out * text_valid[:, :, None, None].to(text_out.dtype)
        order = torch.argsort((~text_valid).to(torch.int8), dim=1, stable=True)
        text_out = torch.gather(text_out, 1, order[:, :, None, None].expand_as(text_out))

        hidden_states = attn.to_out[1](attn.to_out[0](video_out.flatten(2, 3)))
        encoder_hidden_states = text_out.flatten(2, 3)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _text_mask(attention_mask: Any, batch: int, n_text: int, device: torch.device) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, n_text):
        raise ValueError(
            f"Mochi attention: expected the text mask [B, L] = [{batch}, {n_text}] (encoder_attention_mask), "
            f"got {getattr(attention_mask, 'shape', type(attention_mask))}"
        )
    return attention_mask.to(device).bool()


# ----------------------------------------------------------------------------------------------------------------
# the adapter


@dataclass
class MochiEncoders:
    """The frozen conditioning models, as :meth:`MochiAdapter.load_encoders` returns them."""

    vae: nn.Module
    text_encoder: nn.Module  # T5EncoderModel
    tokenizer: Any
    force_zeros_for_empty_prompt: bool
    device: torch.device


class MochiAdapter(common.PipelineAdapter):
    """Mochi 1 preview over diffusers (``genmo/mochi-1-preview`` layout)."""

    family = "mochi"
    display_name = "Mochi"
    release_name = "Mochi 1"
    default_fps = 30.0
    frame_multiple = 6
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    #: Timestep shift of the training noise levels: 1.0 = uniform (Genmo's fine-tuner).
    default_shift = 1.0
    pipeline_class = "MochiPipeline"
    transformer_class = "MochiTransformer3DModel"
    vae_class = "AutoencoderKLMochi"
    encoder_components = ("vae", "text_encoder", "tokenizer")
    transformer_marker = "pos_frequencies"
    repeated_blocks = ("MochiTransformerBlock",)  # diffusers 0.42 declares no _repeated_blocks for Mochi
    radial_rule = "mochi"
    router_processor = MochiRouterAttnProcessor
    stock_processor = "diffusers.models.attention_processor:MochiAttnProcessor2_0"
    #: T5 text length (the pipeline's ``max_sequence_length`` default).
    max_sequence_length = 256

    # -- configs ---------------------------------------------------------------------------------------------
    def _factors(self) -> tuple[int, int, int]:
        """(VAE temporal, VAE spatial, patch) from the configs."""
        vae, tr = self._config("vae"), self._config("transformer")
        t_factor = 1
        for f in vae.get("temporal_expansions", (1, 2, 3)):
            t_factor *= int(f)
        s_factor = 1
        for f in vae.get("spatial_expansions", (2, 2, 2)):
            s_factor *= int(f)
        return t_factor, s_factor, int(tr.get("patch_size", 2))

    # -- loading ---------------------------------------------------------------------------------------------
    def load_pipeline(self, transformer: Optional[nn.Module] = None, encoders: Optional[MochiEncoders] = None) -> Any:
        """``MochiPipeline`` of ``pretrained``; ``transformer`` / ``encoders`` replace the stored ones.

        ValueError if its scheduler does not invert sigmas: that sampler would not match Mochi's (and our)
        timestep convention.
        """
        pipe = super().load_pipeline(transformer, encoders)
        if not getattr(pipe.scheduler.config, "invert_sigmas", False):
            raise ValueError(
                f"model.pretrained: the scheduler of {self.pretrained!r} has invert_sigmas=False; Mochi samples with "
                "FlowMatchEulerDiscreteScheduler(invert_sigmas=True) (timestep 1000*(1 - noise level))"
            )
        return pipe

    def load_encoders(self, device: torch.device) -> MochiEncoders:
        """VAE (tiling on, for long clips), T5 and its tokenizer, frozen; loaded as ``MochiPipeline`` loads them."""
        device = torch.device(device)
        pipe = self._encoder_pipeline(device)
        zeros = bool(self.model_index().get("force_zeros_for_empty_prompt", False))
        return MochiEncoders(pipe.vae, pipe.text_encoder, pipe.tokenizer, zeros, device)

    # -- conditioning ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_videos(self, encoders: MochiEncoders, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised posterior mean, float32 [B, 12, (F-1)/6+1, H/8, W/8]."""
        common.check_pixels(pixels)
        self.geometry(pixels.shape[2], pixels.shape[3], pixels.shape[4])
        vae = encoders.vae
        z = vae.encode(pixels.to(encoders.device, vae.dtype)).latent_dist.mode().float()
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            shape = (1, z.shape[1], 1, 1, 1)
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=z.device).view(shape)
            std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=z.device).view(shape)
            return (z - mean) * cfg.scaling_factor / std
        return z * cfg.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, encoders: MochiEncoders, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [B, 256, 4096] and boolean ``encoder_attention_mask`` [B, 256], as
        ``MochiPipeline.encode_prompt``."""
        prompts = common.check_prompts(prompts)
        tokens = encoders.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids, tokens.attention_mask.bool()
        if encoders.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts])
            ids = ids.masked_fill(empty[:, None], 0)
            mask = mask & ~empty[:, None]
        ids, mask = ids.to(encoders.device), mask.to(encoders.device)
        embeds = encoders.text_encoder(ids, attention_mask=mask)[0]
        return {"encoder_hidden_states": embeds.to(encoders.text_encoder.dtype), "encoder_attention_mask": mask}

    # -- flow matching ---------------------------------------------------------------------------------------
    def training_pair(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_s = (1-s) x0 + s noise; timestep 1000 (1 - s); target x0 - noise (Mochi's inverted time)."""
        noisy = common.noisy_latents(latents, noise, sigmas)
        timesteps = (1.0 - sigmas.to(latents.device, torch.float32)) * 1000.0
        return noisy, timesteps, latents - noise

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity prediction (float32) with the text mask the model needs."""
        common.check_cond(cond, ("encoder_hidden_states", "encoder_attention_mask"))
        model = common.unwrap(transformer)
        dtype, device = model.dtype, noisy.device
        out = transformer(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
            timestep=timesteps.to(device),
            encoder_attention_mask=cond["encoder_attention_mask"].to(device).bool(),
            return_dict=False,
        )[0]
        return out.float()

    # -- attention -------------------------------------------------------------------------------------------
    def _routed_attentions(self, model: nn.Module) -> list[nn.Module]:
        """Every block's ``attn1`` (a ``MochiAttention``: no ``set_processor``, its ``processor`` is assigned)."""
        return [block.attn1 for block in model.transformer_blocks]

    # -- sequence parallelism -------------------------------------------------------------------------------
    def sequence_parallel_hooks(self, transformer: nn.Module, sp: Any, heads: int) -> list[Any]:
        """Mochi embeds per frame and flattens frames into the sequence inside its forward, so the tokens are
        sharded at the first block (called with keywords, or positionally under gradient checkpointing). Its RoPE
        tables are computed from the learned ``pos_frequencies``: sharding them gives each rank the gradient of
        its tokens."""
        from train.sequence_parallel import gather_hook, rope_hook, shard_video

        def shard_tokens(_module: Any, args: tuple, kwargs: dict) -> tuple:
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": shard_video(sp, kwargs["hidden_states"], heads)}
            return (shard_video(sp, args[0], heads), *args[1:]), kwargs

        return [
            transformer.rope.register_forward_hook(rope_hook(sp, 0)),  # (cos, sin) [N, H, D/2]
            transformer.transformer_blocks[0].register_forward_pre_hook(shard_tokens, with_kwargs=True),
            transformer.proj_out.register_forward_hook(gather_hook(sp)),
        ]

    # -- tiny models -----------------------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls) -> Any:
        """A tiny random Mochi pipeline (2 blocks, 12 latent channels as the pipeline's decode expects, T5 32-d,
        offline tokenizer, random RoPE frequencies, scheduler with ``invert_sigmas=True``)."""
        from diffusers import (
            AutoencoderKLMochi,
            FlowMatchEulerDiscreteScheduler,
            MochiPipeline,
            MochiTransformer3DModel,
        )
        from transformers import T5EncoderModel

        from train.tiny.t5_tokenizer import tiny_t5_tokenizer
        from train.tiny.text_encoders import tiny_t5_encoder

        tokenizer = tiny_t5_tokenizer(vocab_size=256, model_max_length=cls.max_sequence_length)
        transformer = MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=12,
            text_embed_dim=32,
            time_embed_dim=8,
            max_sequence_length=cls.max_sequence_length,
        )
        # Released weights learn these; zeros (the constructor's value) would make RoPE a no-op.
        transformer.pos_frequencies.data.normal_(0.0, 0.5)
        vae = AutoencoderKLMochi(
            latent_channels=12,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
        )
        text_encoder = tiny_t5_encoder(T5EncoderModel, tokenizer, feed_forward_proj="gated-gelu")
        return MochiPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
            vae=vae.eval(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer.eval(),
        )

    # -- export ----------------------------------------------------------------------------------------------
    def comfyui_key(self, diffusers_module: str) -> Optional[str]:
        """None: Mochi has no established ComfyUI LoRA naming; export the diffusers format instead."""
        return None
