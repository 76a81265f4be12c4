"""MochiAdapter on a tiny random-weight Mochi pipeline, checked against diffusers' own classes."""

from __future__ import annotations

import dataclasses
import json
import shutil
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
from train.models.mochi import MochiAdapter, MochiRouterAttnProcessor

FRAMES, HEIGHT, WIDTH = 25, 64, 64  # -> latents [B, 12, 5, 8, 8], 5 x 16 = 80 video tokens
LATENT = (12, 5, 8, 8)
TEXT = 16  # T5 tokens (the real model: 256)
PROMPTS = ["a cat walks", "a red car drives down a wet street at night while rain falls"]

tiny_dir, adapter, encoders, lora_transformer = family_fixtures(MochiAdapter, text=TEXT)
cond = cond_fixture(PROMPTS)


# -- registry and shapes -------------------------------------------------------------------------------------
def test_registry() -> None:
    cls = get_adapter("mochi")
    assert cls is MochiAdapter and cls.family == "mochi" and cls.frame_multiple == 6


def test_geometry(adapter: MochiAdapter) -> None:
    g = adapter.geometry(FRAMES, HEIGHT, WIDTH)
    assert (g.latent_frames, g.latent_height, g.latent_width, g.tokens_per_frame, g.video_tokens) == (5, 8, 8, 16, 80)
    assert adapter.geometry_from_latents((1, *LATENT)) == g


def test_geometry_of_the_released_configs(tmp_path: Path) -> None:
    """Real-size configs (no weights): 480x848 at 163 frames (pre-training), 2x and 4x."""
    from diffusers import AutoencoderKLMochi, MochiTransformer3DModel

    folder = config_only_pipeline(tmp_path, "MochiPipeline", transformer=MochiTransformer3DModel, vae=AutoencoderKLMochi)
    adapter = MochiAdapter(folder)
    for frames, latent_frames in ((163, 28), (325, 55), (649, 109)):
        g = adapter.geometry(frames, 480, 848)
        assert (g.latent_frames, g.tokens_per_frame) == (latent_frames, 30 * 53)


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((24, 64, 64), r"frames must be of the form 6k\+1 .* got 24; nearest valid: 19 or 25"),
        ((25, 56, 64), r"height must be a positive multiple of 16 .* got 56; nearest valid: 48 or 64"),
        ((25, 64, 850), r"width must be a positive multiple of 16 .* got 850; nearest valid: 848 or 864"),
    ],
)
def test_geometry_rejects_bad_shapes(adapter: MochiAdapter, args: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        adapter.geometry(*args)


def test_bad_pretrained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        MochiAdapter(str(tmp_path / "missing")).load_pipeline()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(ValueError, match="holds a 'HunyuanVideoPipeline' pipeline of family 'hunyuan_video'"):
        MochiAdapter(str(tmp_path)).load_transformer()


def test_pipeline_with_a_non_inverted_scheduler_is_refused(tiny_dir: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    cfg_path = copy / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["invert_sigmas"] is True
    cfg_path.write_text(json.dumps({**cfg, "invert_sigmas": False}))
    with pytest.raises(ValueError, match="invert_sigmas=False"):
        MochiAdapter(str(copy), dtype=torch.float32).load_pipeline()


# -- tiny pipeline ---------------------------------------------------------------------------------------------
def test_tiny_pipeline_loads_offline(tiny_dir: str, tmp_path: Path) -> None:
    from diffusers import MochiPipeline

    pipe = MochiPipeline.from_pretrained(tiny_dir)
    assert type(pipe.transformer).__name__ == "MochiTransformer3DModel" and pipe.vae.config.latent_channels == 12
    assert pipe.transformer.pos_frequencies.abs().sum() > 0  # RoPE is not a no-op in the tiny model
    again = MochiAdapter.save_tiny_random(str(tmp_path / "again"), seed=0)
    a = MochiPipeline.from_pretrained(again).transformer.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(ValueError, match="not an empty folder"):
        MochiAdapter.save_tiny_random(again)


def test_encode_prompts_matches_pipeline(adapter: MochiAdapter, encoders, cond: dict) -> None:
    pipe = adapter.load_pipeline(encoders=encoders)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=TEXT, device=CPU)
    assert torch.equal(cond["encoder_attention_mask"], mask) and cond["encoder_attention_mask"].dtype == torch.bool
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    lengths = mask.sum(1).tolist()
    assert cond["encoder_hidden_states"].shape == (2, TEXT, 32) and lengths[0] < lengths[1] <= TEXT


def test_empty_prompt_zeros_like_the_pipeline(adapter: MochiAdapter, encoders) -> None:
    from diffusers import MochiPipeline

    zeroing = dataclasses.replace(encoders, force_zeros_for_empty_prompt=True)
    scheduler = adapter.load_pipeline(encoders=encoders).scheduler
    pipe = MochiPipeline(scheduler=scheduler, vae=encoders.vae, text_encoder=encoders.text_encoder,
                         tokenizer=encoders.tokenizer, transformer=None, force_zeros_for_empty_prompt=True)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=TEXT, device=CPU)
    ours = adapter.encode_prompts(zeroing, ["", "a cat"])  # per prompt: only the empty one is zeroed
    assert not ours["encoder_attention_mask"][0].any() and ours["encoder_attention_mask"][1].any()
    torch.testing.assert_close(ours["encoder_hidden_states"][:1], embeds)
    assert torch.equal(ours["encoder_attention_mask"][:1], mask)


def test_encode_videos_normalises_like_the_pipeline_decodes(adapter: MochiAdapter, encoders) -> None:
    pixels = torch.rand(1, 3, 13, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_videos(encoders, pixels)
    assert latents.shape == (1, 12, 3, 4, 6) and latents.dtype == torch.float32
    raw = encoders.vae.encode(pixels).latent_dist.mode()
    cfg = encoders.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 12, 1, 1, 1)
    # MochiPipeline decodes ``latents * latents_std / scaling_factor + latents_mean``
    torch.testing.assert_close(latents * std / cfg.scaling_factor + mean, raw)
    with pytest.raises(ValueError, match="frames must be of the form 6k"):
        adapter.encode_videos(encoders, torch.zeros(1, 3, 9, 32, 48))


# -- flow matching ---------------------------------------------------------------------------------------------
def test_sigmas_are_uniform_and_seeded(adapter: MochiAdapter) -> None:
    s = adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    assert 0.0 < float(s.min()) and float(s.max()) < 1.0
    assert float(s.median()) == pytest.approx(0.5, abs=0.03) and float(s.std()) == pytest.approx(12 ** -0.5, abs=0.02)
    assert torch.equal(s, adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU))


def test_training_pair_is_mochis_inverted_time(adapter: MochiAdapter) -> None:
    x0, noise = torch.zeros(1, *LATENT), torch.ones(1, *LATENT)
    noisy, timesteps, target = adapter.training_pair(x0, noise, torch.tensor([0.25]))
    assert torch.allclose(noisy, torch.full_like(noisy, 0.25)) and torch.equal(timesteps, torch.tensor([750.0]))
    assert torch.equal(target, x0 - noise)  # points from noise to data


def test_training_pair_matches_pipeline_sampling(adapter: MochiAdapter, encoders) -> None:
    """Fed the training target, MochiPipeline (inverted-sigma scheduler, CFG on) must walk the straight path to
    x0 exactly and pass the timesteps training uses: same sign, direction and timestep convention."""
    from diffusers import MochiTransformer3DModel

    class Oracle(MochiTransformer3DModel):
        def forward(self, hidden_states, timestep, **_):
            x0, noise = (t.expand_as(hidden_states) for t in self.path)
            d = (noise - x0).flatten(1)
            s = ((hidden_states.float() - x0).flatten(1) * d).sum(1) / (d * d).sum(1)
            _, expected_t, target = adapter.training_pair(x0, noise, s)
            self.calls.append((timestep.float().clone(), expected_t))
            return (target.to(hidden_states.dtype),)

    oracle = Oracle.from_config(adapter.load_transformer().config)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, *LATENT, generator=g), torch.randn(1, *LATENT, generator=g)
    oracle.path, oracle.calls = (x0, noise), []
    pipe = adapter.load_pipeline(transformer=oracle, encoders=encoders)
    out = pipe(prompt="a cat", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=6, guidance_scale=4.5,
               latents=noise.clone(), max_sequence_length=TEXT, output_type="latent").frames
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(oracle.calls) == 6
    for got, expected in oracle.calls:
        assert got.shape == (2,)  # negative + positive prompt
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-4)
    assert oracle.calls[0][0][0].item() == pytest.approx(0.0, abs=1e-3)  # pure noise is timestep 0 for Mochi


# -- attention processors --------------------------------------------------------------------------------------
def _stock_and_ours(adapter: MochiAdapter, cond: dict):
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    tr = adapter.load_transformer()
    noisy, timesteps, _ = training_batch(adapter, LATENT, b=cond["encoder_attention_mask"].shape[0])
    with torch.no_grad():
        stock = adapter.predict(tr, noisy, timesteps, cond)
        router = adapter.install_attention(tr, AttentionConfig(type="dense"), adapter.geometry(FRAMES, HEIGHT, WIDTH))
        ours = adapter.predict(tr, noisy, timesteps, cond)
    assert all(isinstance(b.attn1.processor, MochiRouterAttnProcessor) for b in tr.transformer_blocks)
    assert [b.attn1.processor.layer_idx for b in tr.transformer_blocks] == [0, 1]
    adapter.remove_attention(tr)
    assert all(type(b.attn1.processor) is MochiAttnProcessor2_0 for b in tr.transformer_blocks)
    return stock, ours, router


def test_dense_processors_equal_stock(adapter: MochiAdapter, cond: dict) -> None:
    """Batch of 2 with different text lengths: the router path reproduces the stock per-sample attention."""
    assert cond["encoder_attention_mask"].sum(1).tolist()[0] < TEXT
    stock, ours, router = _stock_and_ours(adapter, cond)
    assert ours.shape == (2, *LATENT) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert router.step == 1 and router.density() == 1.0


def test_dense_processors_equal_stock_for_any_text_mask(adapter: MochiAdapter) -> None:
    """An all-False mask (zeroed empty prompt) and a mask with holes: stock compacts the valid text rows to the
    front and zeroes the rest; the router processors lay them out the same way."""
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(3, TEXT, dtype=torch.bool)
    mask[1, [0, 3, 4, 9]] = True
    mask[2, :TEXT] = True
    cond = {"encoder_hidden_states": torch.randn(3, TEXT, 32, generator=g), "encoder_attention_mask": mask}
    stock, ours, _ = _stock_and_ours(adapter, cond)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_sparse_training_step_gives_finite_lora_grads(adapter: MochiAdapter, lora_transformer, cond: dict) -> None:
    n_lora = sum(1 for n, _ in lora_transformer.named_parameters() if "lora" in n)
    assert n_lora == 2 * 4 * 2 + 2  # blocks x (q, k, v, out) x (A, B), plus the caption pooler's to_q
    check_sparse_step_gives_finite_lora_grads(joint_step(adapter, lora_transformer, cond, LATENT), n_lora)


def test_all_true_radial_mask_gives_the_dense_loss(adapter: MochiAdapter, lora_transformer, cond: dict) -> None:
    # one block of 128 >= 96 tokens: all True
    check_all_true_radial_mask_gives_the_dense_loss(joint_step(adapter, lora_transformer, cond, LATENT), 128)


def test_radial_triton_kernel_path(adapter: MochiAdapter, cond: dict) -> None:
    """The Triton kernels (interpreter on CPU) behind the processors agree with the torch path (head dim 64 and
    block 64, the smallest the kernels take: 17 latent frames x 16 tokens + 16 text tokens = 5 blocks)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    tr = MochiTransformer3DModel(num_attention_heads=1, attention_head_dim=64, num_layers=1, pooled_projection_dim=16,
                                 in_channels=12, text_embed_dim=32, time_embed_dim=8)
    tr.pos_frequencies.data.normal_(0.0, 0.5)
    tr = add_lora(tr, MochiAdapter.default_lora_targets)
    check_triton_radial_matches_torch(joint_step(adapter, tr, cond, (12, 17, 8, 8)))


def test_pipeline_runs_with_sparse_processors(adapter: MochiAdapter, encoders) -> None:
    pipe, router = sparse_pipeline(adapter, encoders, adapter.geometry(FRAMES, HEIGHT, WIDTH))
    video = pipe(prompt="a cat walks", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                 guidance_scale=4.5, max_sequence_length=TEXT, generator=torch.Generator().manual_seed(0),
                 output_type="np").frames
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and np.isfinite(video).all()
    assert router.step == 2 and 0.0 < router.density() < 1.0  # one batched cond+uncond forward per step


def test_no_comfyui_names(adapter: MochiAdapter) -> None:
    assert adapter.comfyui_key("transformer_blocks.0.attn1.to_q") is None
    assert adapter.comfyui_key("proj_out") is None
