"""HunyuanVideoAdapter on a tiny random-weight HunyuanVideo pipeline, checked against diffusers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from models_helpers import (
    CPU,
    add_lora,
    check_all_true_radial_mask_gives_the_dense_loss,
    check_sparse_step_gives_finite_lora_grads,
    check_triton_radial_matches_torch,
    cond_fixture,
    config_only_pipeline,
    family_fixtures,
    joint_step,
    sparse_pipeline,
    training_batch,
)

from train.config_schema import AttentionConfig
from train.models import get_adapter
from train.models.hunyuan_video import HunyuanVideoAdapter, HunyuanVideoRouterAttnProcessor

FRAMES, HEIGHT, WIDTH = 17, 64, 64  # -> latents [B, 4, 5, 8, 8], 5 x 16 = 80 video tokens
LATENT = (4, 5, 8, 8)
TEXT = 16  # Llama tokens after the template crop (the real model: 256)
PROMPTS = ["a cat walks", "a red car drives down a wet street at night while rain falls on the window"]

tiny_dir, adapter, encoders, lora_transformer = family_fixtures(HunyuanVideoAdapter, text=TEXT)
cond = cond_fixture(PROMPTS)


# -- registry and shapes -------------------------------------------------------------------------------------
def test_registry() -> None:
    cls = get_adapter("hunyuan_video")
    assert cls is HunyuanVideoAdapter and cls.family == "hunyuan_video" and cls.frame_multiple == 4


def test_geometry(adapter: HunyuanVideoAdapter) -> None:
    g = adapter.geometry(FRAMES, HEIGHT, WIDTH)
    assert (g.latent_frames, g.latent_height, g.latent_width, g.tokens_per_frame, g.video_tokens) == (5, 8, 8, 16, 80)
    assert adapter.geometry_from_latents((1, *LATENT)) == g


def test_geometry_of_the_released_configs(tmp_path: Path) -> None:
    """Real-size configs (no weights): 720p at 129 / 253 / 509 frames."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    folder = config_only_pipeline(
        tmp_path, "HunyuanVideoPipeline", transformer=HunyuanVideoTransformer3DModel, vae=AutoencoderKLHunyuanVideo
    )
    adapter = HunyuanVideoAdapter(folder)
    for frames, latent_frames in ((129, 33), (253, 64), (509, 128)):
        g = adapter.geometry(frames, 720, 1280)
        assert (g.latent_frames, g.tokens_per_frame) == (latent_frames, 45 * 80)
    assert adapter.geometry(253, 768, 1280).video_tokens == 64 * 3840


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((16, 64, 64), r"frames must be of the form 4k\+1 .* got 16; nearest valid: 13 or 17"),
        ((0, 64, 64), r"frames .* got 0; nearest valid: 1 or 5"),
        ((17, 72, 64), r"height must be a positive multiple of 16 .* got 72; nearest valid: 64 or 80"),
        ((17, 64, 8), r"width must be a positive multiple of 16 .* got 8; nearest valid: 16"),
    ],
)
def test_geometry_rejects_bad_shapes(adapter: HunyuanVideoAdapter, args: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        adapter.geometry(*args)


def test_geometry_rejects_non_ints(adapter: HunyuanVideoAdapter) -> None:
    with pytest.raises(TypeError, match="height must be an int"):
        adapter.geometry(17, 64.0, 64)  # type: ignore[arg-type]


def test_bad_pretrained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        HunyuanVideoAdapter(str(tmp_path / "missing")).load_transformer()
    with pytest.raises(ValueError, match="no model_index.json"):
        HunyuanVideoAdapter(str(tmp_path)).geometry(17, 64, 64)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    with pytest.raises(ValueError, match="holds a 'MochiPipeline' pipeline of family 'mochi'"):
        HunyuanVideoAdapter(str(tmp_path)).load_encoders(CPU)
    with pytest.raises(ValueError, match="timestep_shift"):
        HunyuanVideoAdapter(str(tmp_path), shift=0.0)
    with pytest.raises(ValueError, match="cannot read model_index.json of 'someorg/not-a-model'"):
        HunyuanVideoAdapter("someorg/not-a-model").geometry(17, 64, 64)  # Hub id, offline in tests


# -- tiny pipeline ---------------------------------------------------------------------------------------------
def test_tiny_pipeline_loads_offline(tiny_dir: str, tmp_path: Path) -> None:
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    pipe = HunyuanVideoPipeline.from_pretrained(tiny_dir)
    assert type(pipe.transformer).__name__ == "HunyuanVideoTransformer3DModel"
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.shift == 7.0
    # the template prefix is exactly crop_start tokens, so the pipeline's crop removes exactly the template
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    # same seed, same weights; a non-empty target is refused
    again = HunyuanVideoAdapter.save_tiny_random(str(tmp_path / "again"), seed=0)
    a = HunyuanVideoPipeline.from_pretrained(again).transformer.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(ValueError, match="not an empty folder"):
        HunyuanVideoAdapter.save_tiny_random(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_encode_prompts_matches_pipeline(adapter: HunyuanVideoAdapter, encoders, cond: dict) -> None:
    pipe = adapter.load_pipeline(encoders=encoders)
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=TEXT, device=CPU)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    assert torch.equal(cond["encoder_attention_mask"], mask)
    assert torch.equal(cond["guidance"], torch.full((2,), 1000.0))  # train_guidance_scale 1.0, times 1000 as the pipeline
    lengths = cond["encoder_attention_mask"].sum(1).tolist()
    assert cond["encoder_hidden_states"].shape == (2, TEXT, 32) and lengths[0] < lengths[1] <= TEXT
    with pytest.raises(TypeError, match="prompts must be a list of str"):
        adapter.encode_prompts(encoders, "a cat")  # type: ignore[arg-type]


def test_encode_videos_normalises_like_the_pipeline_decodes(adapter: HunyuanVideoAdapter, encoders) -> None:
    pixels = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_videos(encoders, pixels)
    assert latents.shape == (1, 4, 3, 4, 6) and latents.dtype == torch.float32
    raw = encoders.vae.encode(pixels).latent_dist.mode()
    # HunyuanVideoPipeline decodes ``latents / scaling_factor``
    torch.testing.assert_close(latents / encoders.vae.config.scaling_factor, raw)
    with pytest.raises(ValueError, match="frames must be of the form 4k"):
        adapter.encode_videos(encoders, torch.zeros(1, 3, 8, 32, 48))


# -- flow matching ---------------------------------------------------------------------------------------------
def test_sigmas_follow_the_sampler_shift(adapter: HunyuanVideoAdapter) -> None:
    s = adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    assert s.shape == (4096,) and 0.0 < float(s.min()) and float(s.max()) < 1.0
    assert float(s.median()) == pytest.approx(7 * 0.5 / (1 + 6 * 0.5), abs=0.02)  # shift 7 of the median u
    assert torch.equal(s, adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU))
    flat = HunyuanVideoAdapter(adapter.pretrained, shift=1.0).sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    assert float(flat.median()) == pytest.approx(0.5, abs=0.03)
    ln = HunyuanVideoAdapter(adapter.pretrained, shift=1.0, timestep_sampling="logit_normal")
    assert float(ln.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU).std()) < float(flat.std())
    with pytest.raises(ValueError, match="timestep_sampling"):
        HunyuanVideoAdapter(adapter.pretrained, timestep_sampling="cosine")


class _OracleMixin:
    """Stands in for the transformer in a pipeline: returns the adapter's training target for one fixed
    (x0, noise) path, estimating the noise level of its input, and records the timesteps it is given."""

    def oracle_forward(self, hidden_states, timestep, **_):
        x0, noise, adapter = self.oracle  # type: ignore[attr-defined]
        d = (noise - x0).flatten(1)
        s = ((hidden_states.float() - x0).flatten(1) * d).sum(1) / (d * d).sum(1)
        _, expected_t, target = adapter.training_pair(x0, noise, s)
        self.calls.append((timestep.float().clone(), expected_t))  # type: ignore[attr-defined]
        return (target.to(hidden_states.dtype),)


def test_training_pair_matches_pipeline_sampling(adapter: HunyuanVideoAdapter, encoders) -> None:
    """Fed the training target, HunyuanVideoPipeline's sampler must walk the straight path to x0 exactly and
    pass the timesteps training uses: same sign, direction and timestep convention."""
    from diffusers import HunyuanVideoTransformer3DModel

    class Oracle(_OracleMixin, HunyuanVideoTransformer3DModel):
        forward = _OracleMixin.oracle_forward

    tr = adapter.load_transformer()
    oracle = Oracle.from_config(tr.config)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, *LATENT, generator=g), torch.randn(1, *LATENT, generator=g)
    oracle.oracle, oracle.calls = (x0, noise, adapter), []
    pipe = adapter.load_pipeline(transformer=oracle, encoders=encoders)
    out = pipe(prompt="a cat", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=6, latents=noise.clone(),
               max_sequence_length=TEXT, output_type="latent").frames
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(oracle.calls) == 6
    for got, expected in oracle.calls:
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-4)
    assert oracle.calls[0][0].item() == pytest.approx(1000.0)


# -- attention processors --------------------------------------------------------------------------------------
def test_dense_processors_equal_stock(adapter: HunyuanVideoAdapter, cond: dict) -> None:
    """Batch of 2 with different text lengths (padded text keys): the router path reproduces the stock model."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    tr = adapter.load_transformer()
    noisy, timesteps, _ = training_batch(adapter, LATENT)
    assert cond["encoder_attention_mask"].sum(1).tolist()[0] < TEXT
    with torch.no_grad():
        stock = adapter.predict(tr, noisy, timesteps, cond)
        router = adapter.install_attention(tr, AttentionConfig(type="dense"), adapter.geometry(FRAMES, HEIGHT, WIDTH))
        ours = adapter.predict(tr, noisy, timesteps, cond)
    procs = [b.attn.processor for b in list(tr.transformer_blocks) + list(tr.single_transformer_blocks)]
    assert all(isinstance(p, HunyuanVideoRouterAttnProcessor) for p in procs)
    assert [p.layer_idx for p in procs] == [0, 1, 2]  # double blocks, then single blocks
    refiner = tr.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    assert type(refiner) is AttnProcessor2_0  # the token refiner stays dense and stock
    assert ours.shape == noisy.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)
    assert router.step == 1 and router.density() == 1.0
    # each sample alone gives the same rows: padding of the other sample never leaks in
    with torch.no_grad():
        single = adapter.predict(tr, noisy[:1], timesteps[:1], {k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(single, ours[:1], atol=1e-5, rtol=1e-5)
    adapter.remove_attention(tr)
    assert all(type(b.attn.processor) is HunyuanVideoAttnProcessor2_0 for b in tr.single_transformer_blocks)


def test_sparse_training_step_gives_finite_lora_grads(adapter: HunyuanVideoAdapter, lora_transformer, cond: dict) -> None:
    n_lora = sum(1 for n, _ in lora_transformer.named_parameters() if "lora" in n)
    check_sparse_step_gives_finite_lora_grads(joint_step(adapter, lora_transformer, cond, LATENT), n_lora)


def test_radial_triton_kernel_path(adapter: HunyuanVideoAdapter, cond: dict) -> None:
    """The Triton kernels (interpreter on CPU) behind the processors agree with the torch path (head dim 64 and
    block 64, the smallest the kernels take: 17 latent frames x 16 tokens + 16 text tokens = 5 blocks)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24))
    tr = add_lora(tr, HunyuanVideoAdapter.default_lora_targets)
    check_triton_radial_matches_torch(joint_step(adapter, tr, cond, (4, 17, 8, 8)))


def test_all_true_radial_mask_gives_the_dense_loss(adapter: HunyuanVideoAdapter, lora_transformer, cond: dict) -> None:
    # one block of 128 >= 96 tokens: all True
    check_all_true_radial_mask_gives_the_dense_loss(joint_step(adapter, lora_transformer, cond, LATENT), 128)


def test_pipeline_runs_with_sparse_processors(adapter: HunyuanVideoAdapter, encoders) -> None:
    pipe, router = sparse_pipeline(adapter, encoders, adapter.geometry(FRAMES, HEIGHT, WIDTH))
    video = pipe(prompt="a cat walks", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                 max_sequence_length=TEXT, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and np.isfinite(video).all()
    assert router.step == 2 and 0.0 < router.density() < 1.0


# -- export names ----------------------------------------------------------------------------------------------
def test_comfyui_keys_invert_diffusers_converter(adapter: HunyuanVideoAdapter) -> None:
    """Our original names, fed to diffusers' own HunyuanVideo converter, come back as the same modules; fused
    projections (A stacked, B block-diagonal in q, k, v[, mlp] order) give back each module's own delta."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    tr = adapter.load_transformer()
    linears = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    assert adapter.comfyui_key("transformer_blocks.0.attn.to_k") == "double_blocks.0.img_attn_qkv"
    assert adapter.comfyui_key("transformer.single_transformer_blocks.1.proj_mlp") == "single_blocks.1.linear1"
    assert adapter.comfyui_key("norm_out.linear") is None  # rows stored as (shift, scale) in the original
    assert adapter.comfyui_key("transformer_blocks.0.attn.processor") is None
    groups: dict[str, list[str]] = {}
    for m in linears:
        key = adapter.comfyui_key(m)
        if key is not None:
            groups.setdefault(key, []).append(m)
    assert set(linears) - {m for ms in groups.values() for m in ms} == {"norm_out.linear"}

    # Plain names: a weight under the original name converts to the diffusers module.
    single = {k: ms[0] for k, ms in groups.items() if len(ms) == 1}
    converted = _convert_hunyuan_video_lora_to_diffusers({f"{k}.weight": torch.zeros(1) for k in single})
    assert set(converted) == {f"transformer.{m}.weight" for m in single.values()}

    # Fused names of the double / single blocks: exact per-module deltas after diffusers' split. (Single blocks
    # are split by the converter at the real hidden size 3072, so those parts are built at that size.)
    g = torch.Generator().manual_seed(0)
    fused, expected = {}, {}
    order = ("to_q", "add_q_proj", "to_k", "add_k_proj", "to_v", "add_v_proj")
    for key, members in groups.items():
        if len(members) == 1 or key.startswith("txt_in."):  # refiner qkv: diffusers' converter can't split LoRA
            continue
        members = sorted(members, key=lambda m: min((i for i, o in enumerate(order) if m.endswith(o)), default=9) // 2)
        a_parts, b_parts = [], []
        for m in members:
            out = (3072 if key.startswith("single") else 6) if "proj_mlp" not in m else 10
            a, b = torch.randn(2, 8, generator=g), torch.randn(out, 2, generator=g)
            a_parts.append(a)
            b_parts.append(b)
            expected[m] = b @ a
        fused[f"{key}.lora_A.weight"] = torch.cat(a_parts)
        fused[f"{key}.lora_B.weight"] = torch.block_diag(*b_parts)
    assert len(expected) == 2 * 3 + 2 * 4  # (img, txt) qkv of one double block, q/k/v/mlp of two single blocks
    back = _convert_hunyuan_video_lora_to_diffusers(fused)
    for m, delta in expected.items():
        got = back[f"transformer.{m}.lora_B.weight"] @ back[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(got, delta)


def test_refiner_fused_names_follow_the_original_weights(adapter: HunyuanVideoAdapter) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    prefix = "context_embedder.token_refiner.refiner_blocks.0.attn"
    names = {adapter.comfyui_key(f"{prefix}.{p}") for p in ("to_q", "to_k", "to_v")}
    assert names == {"txt_in.individual_token_refiner.blocks.0.self_attn_qkv"}
    qkv = torch.arange(6.0).view(6, 1)
    back = _convert_hunyuan_video_lora_to_diffusers({f"{names.pop()}.weight": qkv})
    for i, p in enumerate(("to_q", "to_k", "to_v")):  # the original weight is [q; k; v], the exporter's order
        assert torch.equal(back[f"transformer.{prefix}.{p}.weight"], qkv[2 * i : 2 * i + 2])


def test_predict_checks_cond(adapter: HunyuanVideoAdapter, cond: dict) -> None:
    tr = adapter.load_transformer()
    noisy, timesteps, _ = training_batch(adapter, LATENT)
    with pytest.raises(ValueError, match=r"cond is missing \['pooled_projections'\]"):
        adapter.predict(tr, noisy, timesteps, {k: v for k, v in cond.items() if k != "pooled_projections"})
    with torch.no_grad():  # the embedded guidance reaches the model (the pipeline samples with 6.0 * 1000)
        base = adapter.predict(tr, noisy, timesteps, cond)
        guided = adapter.predict(tr, noisy, timesteps, {**cond, "guidance": torch.full((2,), 6000.0)})
        default = adapter.predict(tr, noisy, timesteps, {k: v for k, v in cond.items() if k != "guidance"})
    assert not torch.allclose(base, guided) and torch.equal(base, default)
    with pytest.raises(ValueError, match="same shape"):
        adapter.training_pair(noisy, noisy[:1], torch.full((2,), 0.5))
