"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel`` + ``AutoencoderKLHunyuanVideo`` + Llama/CLIP).

What this family needs, and the choices made here:

* **Frames and tokens.** The causal VAE compresses time by 4 and space by 8, so pixel frame counts are ``4k+1``
  and the latent clip has ``(F-1)/4 + 1`` frames; the transformer patchifies 1x2x2, so height and width must be
  multiples of 16 and one latent frame is ``(H/16)*(W/16)`` tokens. The factors are read from the VAE and
  transformer configs of ``pretrained``.
* **Latents.** ``encode_videos`` returns the posterior mean times ``vae.config.scaling_factor`` (no shift),
  exactly what ``HunyuanVideoPipeline`` divides out before decoding.
* **Text.** As the pipeline: the prompt goes into the Llama chat template, the hidden states 3rd from last are
  taken and the template's ``crop_start`` tokens (95) are cropped, leaving ``max_sequence_length`` (256) tokens
  and their attention mask; CLIP's pooled output (77 tokens) is ``pooled_projections``.
* **Flow matching.** Sampling (``FlowMatchEulerDiscreteScheduler``, shift 7.0 in the released scheduler config)
  integrates ``x_{s'} = x_s + (s' - s) * v`` from noise level s=1 to 0 with timestep ``t = 1000 s``, so the
  model predicts ``v = noise - x0``. Training uses the same pair: ``x_s = (1-s) x0 + s noise``, timestep
  ``1000 s``, target ``noise - x0``. Noise levels are drawn as the sampler visits them: ``u ~ U(0,1)`` mapped
  through the same shift, ``s = shift*u / (1 + (shift-1)*u)`` (default shift 7.0, ``train.timestep_shift``
  overrides; ``train.timestep_sampling: logit_normal`` draws u from sigmoid(N(0, 1)) instead), so training
  density follows where the 7.0-shifted sampler spends its steps (mostly high noise).
* **Embedded guidance.** The released T2V model is guidance-distilled (``guidance_embeds=True``): the
  transformer takes ``guidance = scale * 1000``. Training conditions on ``train_guidance_scale`` (1.0, as
  finetrainers and musubi-tuner do); the pipeline samples with its ``guidance_scale`` (6.0 by default).
* **Positions for longer clips.** The 3D RoPE (axes 16/56/56 of head dim 128, theta 256) is computed in every
  forward from the latent grid (``arange`` per axis): there is no position table and no maximum length, so
  253 or 509 frames (64 / 128 latent frames vs 33 at 129 frames) just use larger temporal positions. Nothing is
  interpolated; the temporal frequencies extrapolate beyond pre-training and the fine-tune adapts to them
  (as in the Radial Attention paper). Limits are memory and compute only.
* **Attention.** Double-stream blocks (video and text projected separately, attended jointly) and single-stream
  blocks (video and text concatenated in ``hidden_states``) get :class:`HunyuanVideoRouterAttnProcessor`, which
  repeats the stock ``HunyuanVideoAttnProcessor2_0`` math (QK RMS-norm, RoPE on the video tokens only, joint
  attention over ``[video; text]``, output split and projections) and hands the joint attention to the
  :class:`~train.attention.AttentionRouter`: video tokens first, then the text tokens, text dense in both
  directions, and the padded text keys masked out (key padding mask from the transformer's text mask).
  ``layer_idx`` counts the double blocks, then the single blocks. The token refiner (legacy
  ``AttnProcessor2_0``, text only) stays dense and untouched.
* **ComfyUI names.** :meth:`HunyuanVideoAdapter.comfyui_key` gives the original module names
  (``double_blocks.N.img_attn_qkv`` ...); the separate diffusers q/k/v (and the single blocks' q/k/v/mlp) map to
  the one fused original Linear, and the exporter fuses them exactly (A stacked, B block-diagonal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from train.models import common

__all__ = ["HunyuanVideoAdapter", "HunyuanVideoEncoders", "HunyuanVideoRouterAttnProcessor"]


# ----------------------------------------------------------------------------------------------------------------
# attention processor


class HunyuanVideoRouterAttnProcessor(common.RouterAttnProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with its joint attention routed through an ``AttentionRouter``.

    Same projections, QK norms, RoPE (video part only) and output split as the stock processor, so with a dense
    router the model output is the stock output. Works for the double-stream blocks (separate ``add_*_proj``
    text projections) and the single-stream blocks (text concatenated to ``hidden_states`` here, as stock).
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from diffusers.models.embeddings import apply_rotary_emb

        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = common.project_heads(
            attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        )

        if image_rotary_emb is not None:  # RoPE on the video tokens only
            n_video = query.shape[1] - (text_tokens if single_stream else 0)
            rope_q = apply_rotary_emb(query[:, :n_video], image_rotary_emb, sequence_dim=1)
            rope_k = apply_rotary_emb(key[:, :n_video], image_rotary_emb, sequence_dim=1)
            query = torch.cat([rope_q, query[:, n_video:]], dim=1)
            key = torch.cat([rope_k, key[:, n_video:]], dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # double-stream: text projections
            enc_q, enc_k, enc_v = common.project_heads(
                attn,
                encoder_hidden_states,
                (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)

        batch, tokens = query.shape[0], query.shape[1]
        out = self.attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            text_tokens=text_tokens,
            key_padding_mask=_key_padding_mask(attention_mask, batch, tokens),
        )
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :-text_tokens], hidden_states[:, -text_tokens:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _key_padding_mask(attention_mask: Optional[torch.Tensor], batch: int, tokens: int) -> Optional[torch.Tensor]:
    """The transformer's ``[B, 1, 1, N]`` boolean key mask (valid video + valid text keys) as ``[B, N]``."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.numel() != batch * tokens:
        raise ValueError(
            "HunyuanVideo attention: expected the boolean [B, 1, 1, N] key mask HunyuanVideoTransformer3DModel "
            f"builds (B={batch}, N={tokens}), got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    return attention_mask.reshape(batch, tokens)


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI (original HunyuanVideo) module names

_TOP_LEVEL = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    # norm_out.linear has no name-only mapping: the original stores (shift, scale) rows, diffusers (scale, shift).
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
}
_DOUBLE = {
    "attn.to_q": "img_attn_qkv",
    "attn.to_k": "img_attn_qkv",
    "attn.to_v": "img_attn_qkv",
    "attn.add_q_proj": "txt_attn_qkv",
    "attn.add_k_proj": "txt_attn_qkv",
    "attn.add_v_proj": "txt_attn_qkv",
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
}
_SINGLE = {
    "attn.to_q": "linear1",
    "attn.to_k": "linear1",
    "attn.to_v": "linear1",
    "proj_mlp": "linear1",
    "proj_out": "linear2",
    "norm.linear": "modulation.linear",
}
_REFINER = {
    "attn.to_q": "self_attn_qkv",
    "attn.to_k": "self_attn_qkv",
    "attn.to_v": "self_attn_qkv",
    "attn.to_out.0": "self_attn_proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
    "norm_out.linear": "adaLN_modulation.1",
}
_BLOCK = re.compile(
    r"^(transformer_blocks|single_transformer_blocks|context_embedder\.token_refiner\.refiner_blocks)\.(\d+)\.(.+)$"
)
_BLOCK_NAMES = {
    "transformer_blocks": ("double_blocks", _DOUBLE),
    "single_transformer_blocks": ("single_blocks", _SINGLE),
    "context_embedder.token_refiner.refiner_blocks": ("txt_in.individual_token_refiner.blocks", _REFINER),
}


# ----------------------------------------------------------------------------------------------------------------
# the adapter


@dataclass
class HunyuanVideoEncoders:
    """The frozen conditioning models, as :meth:`HunyuanVideoAdapter.load_encoders` returns them."""

    vae: nn.Module
    text_encoder: nn.Module  # LlamaModel
    tokenizer: Any
    text_encoder_2: nn.Module  # CLIPTextModel
    tokenizer_2: Any
    device: torch.device


class HunyuanVideoAdapter(common.PipelineAdapter):
    """HunyuanVideo T2V over diffusers (``hunyuanvideo-community/HunyuanVideo`` layout)."""

    family = "hunyuan_video"
    display_name = "HunyuanVideo"
    release_name = "HunyuanVideo"
    default_fps = 24.0
    comfyui_fuses = True  # split q/k/v (and the single blocks' MLP) map onto fused original weights
    frame_multiple = 4
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    #: Timestep shift of the training noise levels: 7.0, the sampler's.
    default_shift = 7.0
    pipeline_class = "HunyuanVideoPipeline"
    transformer_class = "HunyuanVideoTransformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo"
    encoder_components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    transformer_marker = "single_transformer_blocks"
    radial_rule = "hunyuan_video"
    router_processor = HunyuanVideoRouterAttnProcessor
    stock_processor = "diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0"
    #: Embedded guidance the distilled transformer is conditioned on during training (times 1000 in the model).
    train_guidance_scale = 1.0
    #: Llama text length after the template crop (the pipeline's ``max_sequence_length`` default).
    max_sequence_length = 256
    #: CLIP text length (the pipeline's fixed 77).
    clip_max_length = 77
    #: Llama hidden states skipped from the end (the pipeline's ``num_hidden_layers_to_skip``).
    num_hidden_layers_to_skip = 2

    # -- configs ---------------------------------------------------------------------------------------------
    def _factors(self) -> tuple[int, int, int]:
        """(VAE temporal, VAE spatial, patch) from the configs."""
        vae, tr = self._config("vae"), self._config("transformer")
        if int(tr.get("patch_size_t", 1)) != 1:
            raise ValueError(f"HunyuanVideo: temporal patch size {tr.get('patch_size_t')} is not supported (expected 1)")
        t_factor, s_factor = int(vae.get("temporal_compression_ratio", 4)), int(vae.get("spatial_compression_ratio", 8))
        return t_factor, s_factor, int(tr.get("patch_size", 2))

    # -- loading ---------------------------------------------------------------------------------------------
    def load_encoders(self, device: torch.device) -> HunyuanVideoEncoders:
        """VAE (tiling on: long 720p clips would not fit otherwise), Llama + CLIP and their tokenizers, frozen.

        Loaded through ``HunyuanVideoPipeline.from_pretrained`` without its transformer, so classes and dtypes
        are exactly those the pipeline uses.
        """
        device = torch.device(device)
        pipe = self._encoder_pipeline(device)
        return HunyuanVideoEncoders(
            pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, device
        )

    # -- conditioning ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_videos(self, encoders: HunyuanVideoEncoders, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> posterior mean * scaling_factor, float32 [B, C, (F-1)/4+1, H/8, W/8]."""
        common.check_pixels(pixels)
        self.geometry(pixels.shape[2], pixels.shape[3], pixels.shape[4])
        vae = encoders.vae
        dist = vae.encode(pixels.to(encoders.device, vae.dtype)).latent_dist
        return (dist.mode() * vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_prompts(self, encoders: HunyuanVideoEncoders, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encoder_hidden_states`` [B, 256, 4096], ``encoder_attention_mask`` [B, 256] (1 = token),
        ``pooled_projections`` [B, 768] (HunyuanVideoPipeline.encode_prompt with its default template), and for
        the guidance-distilled transformer ``guidance`` [B] = ``train_guidance_scale * 1000``."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        prompts = common.check_prompts(prompts)
        device = encoders.device
        crop_start = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
        templated = [DEFAULT_PROMPT_TEMPLATE["template"].format(p) for p in prompts]
        tokens = encoders.tokenizer(
            templated,
            max_length=self.max_sequence_length + crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = encoders.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = hidden[-(self.num_hidden_layers_to_skip + 1)].to(encoders.text_encoder.dtype)
        embeds, mask = embeds[:, crop_start:], mask[:, crop_start:]

        clip_ids = encoders.tokenizer_2(
            prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = encoders.text_encoder_2(clip_ids.to(device), output_hidden_states=False).pooler_output
        cond = {
            "encoder_hidden_states": embeds,
            "encoder_attention_mask": mask,
            "pooled_projections": pooled.to(encoders.text_encoder_2.dtype),
        }
        if self._config("transformer").get("guidance_embeds", True):
            cond["guidance"] = self._guidance(len(prompts), device)
        return cond

    def _guidance(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), float(self.train_guidance_scale) * 1000.0, device=device, dtype=torch.float32)

    # -- flow matching ---------------------------------------------------------------------------------------
    def training_pair(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_s = (1-s) x0 + s noise; timestep 1000 s; target noise - x0 (what the Euler sampler integrates)."""
        noisy = common.noisy_latents(latents, noise, sigmas)
        return noisy, sigmas.to(latents.device, torch.float32) * 1000.0, noise - latents

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity prediction (float32), with the text mask, pooled CLIP and embedded guidance the model takes
        (``cond["guidance"]``, else ``train_guidance_scale``; none for a transformer without guidance embedding)."""
        common.check_cond(cond, ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"))
        model = common.unwrap(transformer)
        dtype, device = model.dtype, noisy.device
        guidance = None
        if model.config.guidance_embeds:
            guidance = cond.get("guidance")
            guidance = (self._guidance(noisy.shape[0], device) if guidance is None else guidance).to(device, dtype)
        out = transformer(
            hidden_states=noisy.to(dtype),
            timestep=timesteps.to(device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
            encoder_attention_mask=cond["encoder_attention_mask"].to(device, dtype),
            pooled_projections=cond["pooled_projections"].to(device, dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.float()

    # -- attention -------------------------------------------------------------------------------------------
    def _routed_attentions(self, model: nn.Module) -> list[nn.Module]:
        """Every double-stream block's ``attn``, then every single-stream block's (the token refiner stays)."""
        return [block.attn for block in list(model.transformer_blocks) + list(model.single_transformer_blocks)]

    # -- sequence parallelism -------------------------------------------------------------------------------
    def sequence_parallel_hooks(self, transformer: nn.Module, sp: Any, heads: int) -> list[Any]:
        """Shard the patch embedding's output: the forward then builds its [video; text] key mask from the local
        video length, so the blocks (double: separate streams; single: [video; text] split by the text length) and
        the processor see a consistent local layout. The token refiner is text only and stays replicated."""
        from train.sequence_parallel import gather_hook, rope_hook, shard_video

        condition = getattr(transformer.config, "image_condition_type", None)
        if condition == "token_replace":
            raise ValueError(
                "sequence parallelism does not support HunyuanVideo with image_condition_type='token_replace' (its "
                "first-frame tokens are modulated apart, which assumes the whole sequence on every rank)"
            )

        def shard_tokens(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return shard_video(sp, output, heads)

        return [
            transformer.rope.register_forward_hook(rope_hook(sp, 0)),  # (cos, sin) [N, D]
            transformer.x_embedder.register_forward_hook(shard_tokens),
            transformer.proj_out.register_forward_hook(gather_hook(sp)),
        ]

    # -- tiny models -----------------------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls) -> Any:
        """A tiny random HunyuanVideo pipeline (1 double + 2 single blocks, 4 latent channels, Llama 32-d,
        CLIP 16-d, offline tokenizers, guidance-distilled like the release, scheduler shift 7.0)."""
        from diffusers import (
            AutoencoderKLHunyuanVideo,
            FlowMatchEulerDiscreteScheduler,
            HunyuanVideoPipeline,
            HunyuanVideoTransformer3DModel,
        )
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        from train.tiny.text_encoders import (
            tiny_clip_text_model,
            tiny_clip_tokenizer,
            tiny_llama_model,
            tiny_llama_tokenizer,
        )

        template = DEFAULT_PROMPT_TEMPLATE["template"]
        tokenizer = tiny_llama_tokenizer(template.split("{}")[0], crop_start=int(DEFAULT_PROMPT_TEMPLATE["crop_start"]))
        tokenizer_2 = tiny_clip_tokenizer()
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=2,
            num_refiner_layers=1,
            text_embed_dim=32,
            pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6),
            guidance_embeds=True,
        )
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
        )
        text_encoder = tiny_llama_model(len(tokenizer), 32)
        text_encoder_2 = tiny_clip_text_model(
            len(tokenizer_2),
            16,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
        return HunyuanVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer.eval(),
            vae=vae.eval(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )

    # -- export ----------------------------------------------------------------------------------------------
    def comfyui_key(self, diffusers_module: str) -> Optional[str]:
        """Original HunyuanVideo module name (``double_blocks.3.img_attn_qkv``) for a diffusers module name.

        The diffusers q/k/v (and the single blocks' q/k/v/proj_mlp) are parts of one fused original Linear:
        they all map to that name and the exporter fuses them exactly. None where no weight-exact name exists
        (``norm_out.linear``: its rows are stored in the other order).
        """
        name = diffusers_module.removeprefix("transformer.")
        if name in _TOP_LEVEL:
            return _TOP_LEVEL[name]
        match = _BLOCK.match(name)
        if match is None:
            return None
        prefix, table = _BLOCK_NAMES[match.group(1)]
        leaf = table.get(match.group(3))
        return None if leaf is None else f"{prefix}.{match.group(2)}.{leaf}"
