"""WanAdapter on a tiny random-weight Wan pipeline, checked against diffusers' own classes."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from models_helpers import (
    CPU,
    check_all_true_radial_mask_gives_the_dense_loss,
    check_sparse_step_gives_finite_lora_grads,
    family_fixtures,
    loss_and_grads,
    sparse_pipeline,
)

from train.config_schema import AttentionConfig
from train.models import ADAPTERS, get_adapter
from train.models.wan import WanAdapter, WanSparseAttnProcessor

FRAMES, HEIGHT, WIDTH = 17, 64, 64  # -> latents [B, 4, 5, 8, 8], 5 x 16 = 80 video tokens

tiny_dir, adapter, encoders, lora_transformer = family_fixtures(WanAdapter)


def _batch(adapter: WanAdapter, b: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 5, 8, 8, generator=g)
    noise = torch.randn(b, 4, 5, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(b, 24, 32, generator=g)}
    noisy, timesteps, target = adapter.training_pair(latents, noise, torch.full((b,), 0.6))
    return noisy, timesteps, target, cond


# -- registry ----------------------------------------------------------------------------------------
def test_registry() -> None:
    assert get_adapter("wan") is WanAdapter
    assert set(ADAPTERS) == {"wan", "hunyuan_video", "mochi"}
    with pytest.raises(ValueError, match=r"model.family.*\['hunyuan_video', 'mochi', 'wan'\].*'sora'"):
        get_adapter("sora")


# -- shapes ------------------------------------------------------------------------------------------
def test_geometry(adapter: WanAdapter) -> None:
    g = adapter.geometry(81, 480, 832)  # Wan2.1-1.3B 480p; the tiny model has the real VAE / patch factors
    assert (g.latent_frames, g.latent_height, g.latent_width, g.tokens_per_frame) == (21, 60, 104, 1560)
    assert adapter.geometry(321, 480, 832).video_tokens == 126_360
    assert adapter.geometry(FRAMES, HEIGHT, WIDTH).video_tokens == 80
    assert adapter.geometry_from_latents((1, 4, 5, 8, 8)) == adapter.geometry(FRAMES, HEIGHT, WIDTH)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((80, 480, 832), r"frames=80 .*4k\+1.*77 or 81"),
        ((81, 470, 832), r"height=470 .*16.*464 or 480"),
        ((81, 480, 840), r"width=840 .*16.*832 or 848"),
        ((4097, 480, 832), r"frames=4097 .*RoPE.*at most 4093"),
        ((0, 480, 832), r"frames must be >= 1"),
    ],
)
def test_geometry_rejects_bad_shapes(adapter: WanAdapter, args: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        adapter.geometry(*args)


def test_geometry_rejects_non_ints(adapter: WanAdapter) -> None:
    with pytest.raises(TypeError, match="frames must be an int"):
        adapter.geometry(81.0, 480, 832)  # type: ignore[arg-type]


def test_bad_pretrained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.pretrained"):
        WanAdapter(str(tmp_path / "missing")).load_transformer()
    other = tmp_path / "hunyuan"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(ValueError, match=r"model.pretrained.*HunyuanVideoPipeline.*'hunyuan_video'"):
        WanAdapter(str(other)).geometry(81, 480, 832)


# -- tiny pipeline -----------------------------------------------------------------------------------
def test_tiny_pipeline_loads_offline_and_is_reproducible(tiny_dir: str, tmp_path: Path) -> None:
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    pipe = WanPipeline.from_pretrained(tiny_dir)
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert pipe.text_encoder.config.d_model == pipe.transformer.config.text_dim
    assert pipe.tokenizer("a cat walks").input_ids[-1] == pipe.tokenizer.eos_token_id
    again = WanPipeline.from_pretrained(WanAdapter.save_tiny_random(str(tmp_path / "again"), seed=0))
    for name, p in pipe.transformer.state_dict().items():
        assert torch.equal(p, again.transformer.state_dict()[name]), name
    assert pipe.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="not an empty folder"):
        WanAdapter.save_tiny_random(str(tmp_path / "again"))


def test_tiny_tokenizer_is_offline_t5_style_and_deterministic(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from train.tiny.t5_tokenizer import save_tiny_t5_tokenizer, tiny_t5_tokenizer

    tok = save_tiny_t5_tokenizer(tmp_path / "tok", model_max_length=16)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == tiny_t5_tokenizer(model_max_length=16).get_vocab() == tok.get_vocab()
    text = "A Cat #42 walks on the grass!"
    ids = loaded(text).input_ids
    assert ids[-1] == loaded.eos_token_id == 1 and loaded.pad_token_id == 0
    assert loaded.unk_token_id not in ids  # every ASCII character is in the vocabulary
    assert loaded.decode(ids, skip_special_tokens=True) == text
    batch = loaded(["a cat", text], padding="max_length", max_length=16, truncation=True)
    assert [len(x) for x in batch.input_ids] == [16, 16] and batch.attention_mask[0][-1] == 0


# -- conditioning ------------------------------------------------------------------------------------
def test_encode_prompts_matches_pipeline(adapter: WanAdapter, encoders) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(adapter.pretrained, text_encoder=encoders.text_encoder)
    prompts = ["A cat   walks on the grass.", "a red car drives down a wet street at night, fast"]
    got = adapter.encode_prompts(encoders, prompts)["encoder_hidden_states"]
    want, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                 max_sequence_length=encoders.max_sequence_length, device=CPU)
    assert got.shape == (2, 512, 32) and encoders.max_sequence_length == 512  # WanPipeline's default length
    assert torch.equal(got, want)
    assert not got[0, -1].any()  # zeros after the prompt's own tokens


def test_encode_videos_normalises_like_the_pipeline_decodes(adapter: WanAdapter, encoders) -> None:
    vae = encoders.vae
    pixels = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_videos(encoders, pixels)
    assert latents.shape == (1, 4, 5, 8, 8) and latents.dtype == torch.float32
    # WanPipeline's decode: latents / (1 / std) + mean must give back the VAE's own latents
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents / std + mean, raw, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="frames=16"):
        adapter.encode_videos(encoders, pixels[:, :, :16])


# -- flow matching -----------------------------------------------------------------------------------
def test_sigmas_are_shifted_and_seeded(adapter: WanAdapter) -> None:
    s1 = adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    s2 = adapter.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    assert torch.equal(s1, s2) and s1.shape == (4096,)
    assert 0.0 < float(s1.min()) and float(s1.max()) < 1.0
    # shift 3 maps the uniform median 0.5 to 0.75
    assert float(s1.median()) == pytest.approx(0.75, abs=0.03)
    flat = WanAdapter(adapter.pretrained, shift=1.0).sample_sigmas(4096, torch.Generator().manual_seed(1), CPU)
    assert float(flat.median()) == pytest.approx(0.5, abs=0.03)
    ln = WanAdapter(adapter.pretrained, timestep_sampling="logit_normal", shift=1.0)
    assert float(ln.sample_sigmas(4096, torch.Generator().manual_seed(1), CPU).std()) < float(flat.std())


def test_training_pair_follows_the_scheduler(adapter: WanAdapter) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 5, 8, 8, generator=g), torch.randn(1, 4, 5, 8, 8, generator=g)
    sigma, sigma_next = sched.sigmas[1], sched.sigmas[2]
    noisy, timesteps, target = adapter.training_pair(x0, noise, sigma.view(1))
    torch.testing.assert_close(timesteps, sched.timesteps[1].view(1))
    torch.testing.assert_close(noisy, sched.scale_noise(x0, sched.timesteps[1].view(1), noise))
    # an Euler step with the exact target lands on the next point of the same straight path
    sched.set_begin_index(1)
    stepped = sched.step(target, sched.timesteps[1], noisy, return_dict=False)[0]
    torch.testing.assert_close(stepped, (1 - sigma_next) * x0 + sigma_next * noise, atol=1e-5, rtol=1e-5)


# -- attention processors ----------------------------------------------------------------------------
def test_dense_processor_is_bit_identical_to_stock(adapter: WanAdapter) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    tr = adapter.load_transformer()
    noisy, timesteps, _, cond = _batch(adapter, b=2)
    stock = adapter.predict(tr, noisy, timesteps, cond)
    router = adapter.install_attention(tr, AttentionConfig(type="dense"), adapter.geometry(FRAMES, HEIGHT, WIDTH))
    assert all(isinstance(b.attn1.processor, WanSparseAttnProcessor) for b in tr.blocks)
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in tr.blocks)  # text cross-attention untouched
    ours = adapter.predict(tr, noisy, timesteps, cond)
    assert ours.shape == noisy.shape and torch.equal(ours, stock)
    assert router.step == 1 and router.density() == 1.0
    tr.blocks[0].attn1.fuse_projections()  # the fused-QKV path too
    assert torch.equal(adapter.predict(tr, noisy, timesteps, cond), stock)
    adapter.remove_attention(tr)
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in tr.blocks)


def _loss_and_grads(adapter: WanAdapter, tr, cfg: AttentionConfig, *, checkpointing: bool):
    noisy, timesteps, target, cond = _batch(adapter)
    geometry = adapter.geometry(FRAMES, HEIGHT, WIDTH)
    loss, grads, router = loss_and_grads(adapter, tr, cfg, geometry, (noisy, timesteps, target), cond,
                                         checkpointing=checkpointing)
    assert grads.keys() == {n for n, _ in tr.named_parameters() if "lora" in n}  # every LoRA parameter got one
    return loss, grads, router


def test_sparse_training_step_gives_finite_lora_grads(adapter: WanAdapter, lora_transformer) -> None:
    n_lora = 2 * 2 * 4 * 2  # layers x (attn1, attn2) x (q, k, v, out) x (A, B)
    check_sparse_step_gives_finite_lora_grads(partial(_loss_and_grads, adapter, lora_transformer), n_lora)


def test_all_true_radial_mask_gives_the_dense_loss(adapter: WanAdapter, lora_transformer) -> None:
    # one block of 96 > 80 tokens: all True
    check_all_true_radial_mask_gives_the_dense_loss(partial(_loss_and_grads, adapter, lora_transformer), 96)


def test_svg2_checkpointing_replays_the_routing(adapter: WanAdapter, lora_transformer) -> None:
    # Two fresh routers start cold from the same deterministic seeding: with the routing replayed in the
    # recomputation, gradient checkpointing must not change the gradients.
    cfg = AttentionConfig(type="svg2", num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0,
                          kmeans_iters=1, backend="torch")
    loss_a, grads_a, _ = _loss_and_grads(adapter, lora_transformer, cfg, checkpointing=False)
    loss_b, grads_b, _ = _loss_and_grads(adapter, lora_transformer, cfg, checkpointing=True)
    assert torch.equal(loss_a, loss_b)
    for n, g in grads_a.items():
        torch.testing.assert_close(grads_b[n], g, atol=1e-6, rtol=1e-5)


def test_pipeline_runs_with_sparse_processors(adapter: WanAdapter, encoders) -> None:
    pipe, router = sparse_pipeline(adapter, encoders, adapter.geometry(FRAMES, HEIGHT, WIDTH))
    kwargs = dict(prompt="a cat walks", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                  max_sequence_length=encoders.max_sequence_length, output_type="np")
    gen = torch.Generator().manual_seed(0)
    video = pipe(num_frames=FRAMES, height=HEIGHT, width=WIDTH, generator=gen, **kwargs).frames
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and np.isfinite(video).all()
    assert router.step == 4  # 2 steps x (cond, uncond)
    assert 0.0 < router.density() < 1.0
    # another size (validation at other settings): the router follows the latents it is given
    with router.dense_override():
        small = pipe(num_frames=9, height=32, width=48, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert small.shape == (1, 9, 32, 48, 3) and router.geometry.video_tokens == 3 * 6
    assert router.density() == 1.0


# -- export names ------------------------------------------------------------------------------------
def test_comfyui_keys_invert_diffusers_converter(adapter: WanAdapter) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    assert adapter.comfyui_key("blocks.7.attn1.to_q") == "blocks.7.self_attn.q"
    assert adapter.comfyui_key("transformer.blocks.0.attn2.to_out.0") == "blocks.0.cross_attn.o"
    assert adapter.comfyui_key("blocks.3.ffn.net.0.proj") == "blocks.3.ffn.0"
    assert adapter.comfyui_key("proj_out") == "head.head"
    assert adapter.comfyui_key("blocks.0.attn1.processor") is None
    modules = [f"blocks.{i}.{m}" for i in range(2) for m in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")]
    ours, original = {}, {}
    for j, m in enumerate(modules):
        a, b = torch.full((4, 8), float(j)), torch.full((8, 4), -float(j))
        ours[f"{m}.lora_A.weight"], ours[f"{m}.lora_B.weight"] = a, b
        comfy = f"diffusion_model.{adapter.comfyui_key(m)}"
        original[f"{comfy}.lora_down.weight"], original[f"{comfy}.lora_up.weight"] = a, b
    back = _convert_non_diffusers_wan_lora_to_diffusers(original)
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
