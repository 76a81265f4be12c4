"""Ulysses sequence parallelism: 2 processes on gloo reproduce the single-process loss and gradients.

Wan (text by cross-attention) and the joint-attention families HunyuanVideo and Mochi (video tokens sharded,
padded text replicated), dense and radial. Gradients are averaged over the ranks as DDP does, with the loss
scaled by P as the trainer does."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.config_schema import AttentionConfig
from train.models import get_adapter

FRAMES, SIZE = 9, 64  # Wan: 3 latent frames x 16 tokens = 48 tokens, 2 heads: divisible by 2
#: Joint-attention families: 5 latent frames x 16 tokens = 80 video tokens (+ 256 padded text tokens).
JOINT_FRAMES = {"hunyuan_video": 17, "mochi": 25}
PROMPTS = ["a cat", "a red fox runs through the snow under a bright blue winter sky"]


def _wan_inputs(text_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "hidden_states": torch.randn(1, 4, 3, SIZE // 8, SIZE // 8, generator=g),
        "timestep": torch.tensor([400.0]),
        "encoder_hidden_states": torch.randn(1, 7, text_dim, generator=g),
        "target": torch.randn(1, 4, 3, SIZE // 8, SIZE // 8, generator=g),
    }


def _forward(family: str, adapter: Any, transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
    if family == "wan":
        x = _wan_inputs(transformer.config.text_dim)
        out = transformer(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0]
        return torch.nn.functional.mse_loss(out, x["target"])
    pred = adapter.predict(transformer, inputs["noisy"], inputs["timesteps"], inputs["cond"])
    return torch.nn.functional.mse_loss(pred, inputs["target"])


def _loss_and_grads(
    family: str, model_dir: str, attention: str, sp_size: int, inputs_path: str = ""
) -> tuple[float, dict[str, torch.Tensor], float]:
    adapter = get_adapter(family)(model_dir, dtype=torch.float32)
    transformer = adapter.load_transformer().float()
    frames = JOINT_FRAMES.get(family, FRAMES)
    geometry = adapter.geometry(frames, SIZE, SIZE)
    extra = {}
    if attention == "svg2":  # top_p = min_kc_ratio = 1 keeps every cluster pair: exact whatever the clustering
        extra = dict(top_p=1.0, min_kc_ratio=1.0, num_q_clusters=4, num_k_clusters=8)
    cfg = AttentionConfig(type=attention, block_size=16, backend="torch", **extra)
    router = adapter.install_attention(transformer, cfg, geometry)
    scale = 1
    if sp_size > 1:
        from train import sequence_parallel

        sp = sequence_parallel.SequenceParallel.create(sp_size)
        adapter.install_sequence_parallel(transformer, sp)
        router.sequence_parallel = sp
        scale = sp.size
    inputs = torch.load(inputs_path) if inputs_path else {}
    loss = _forward(family, adapter, transformer, inputs)
    (loss * scale).backward()
    grads = {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if p.grad is not None}
    if sp_size > 1:  # what DDP does: average over all ranks
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return loss.item(), grads, router.density()


def _worker(rank: int, world: int, port: int, family: str, model_dir: str, attention: str, inputs: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        loss, grads, _ = _loss_and_grads(family, model_dir, attention, sp_size=world, inputs_path=inputs)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _joint_inputs(family: str, model_dir: str, path: Path) -> str:
    """A batch of two prompts of different lengths (both padded to 256 text tokens) through the family's own
    encoders, random latents / noise / noise levels through its training pair; saved for every process."""
    adapter = get_adapter(family)(model_dir, dtype=torch.float32)
    encoders = adapter.load_encoders(torch.device("cpu"))
    cond = adapter.encode_prompts(encoders, PROMPTS)
    mask = cond["encoder_attention_mask"].bool()
    assert (~mask).any(dim=1).all() and mask.sum(1)[0] != mask.sum(1)[1], "want padding, of different lengths"
    g = torch.Generator().manual_seed(7)
    latent_frames = (JOINT_FRAMES[family] - 1) // adapter.frame_multiple + 1
    channels = 4 if family == "hunyuan_video" else 12
    shape = (2, channels, latent_frames, SIZE // 8, SIZE // 8)
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noisy, timesteps, target = adapter.training_pair(latents, noise, torch.tensor([0.3, 0.8]))
    out = str(path / f"{family}_inputs.pt")
    torch.save({"noisy": noisy, "timesteps": timesteps, "target": target, "cond": dict(cond)}, out)
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """family -> (model folder, saved inputs) for each family, built once."""
    root = tmp_path_factory.mktemp("sp")
    models = {"wan": (get_adapter("wan").save_tiny_random(str(root / "wan"), seed=0), "")}
    for family in JOINT_FRAMES:
        folder = get_adapter(family).save_tiny_random(str(root / family), seed=0)
        models[family] = (folder, _joint_inputs(family, folder, root))
    return models


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "mochi"])
@pytest.mark.parametrize("attention", ["dense", "radial", "svg2"])
def test_sp2_matches_single_process(tiny_models: dict, family: str, attention: str, tmp_path: Path) -> None:
    model_dir, inputs = tiny_models[family]
    torch.manual_seed(0)
    ref_loss, ref_grads, density = _loss_and_grads(family, model_dir, attention, sp_size=1, inputs_path=inputs)
    if attention == "radial":
        assert density < 1.0, "the radial mask must actually skip blocks for this test to mean something"
    out = str(tmp_path / "sp.pt")
    mp.spawn(_worker, args=(2, _free_port(), family, model_dir, attention, inputs, out), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert set(got["grads"]) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def _fake_sp(size: int = 2) -> Any:
    from train import sequence_parallel

    return sequence_parallel.SequenceParallel(size=size, rank=0, dp_rank=0, dp_size=1, group=None)


def test_families_without_wiring_and_non_diffusers_models_are_refused_clearly(tiny_models: dict) -> None:
    """A family that does not override ``sequence_parallel_hooks`` gets the base class's one-line refusal; a module
    that is not a diffusers transformer is named."""
    from train.models.base import ModelAdapter

    adapter = get_adapter("wan")(tiny_models["wan"][0], dtype=torch.float32)
    with pytest.raises(ValueError, match="sequence_parallel_size > 1 is not implemented for model.family 'wan'"):
        ModelAdapter.sequence_parallel_hooks(adapter, adapter.load_transformer(), _fake_sp(), 2)
    with pytest.raises(TypeError, match="needs the diffusers transformer, got Linear"):
        adapter.install_sequence_parallel(torch.nn.Linear(2, 2), _fake_sp())


def test_heads_not_divisible_are_refused(tiny_models: dict) -> None:
    for family in ("hunyuan_video", "mochi"):
        adapter = get_adapter(family)(tiny_models[family][0], dtype=torch.float32)
        with pytest.raises(ValueError, match="2 attention heads are not divisible by parallel.sequence_parallel_size=3"):
            adapter.install_sequence_parallel(adapter.load_transformer(), _fake_sp(3))


def test_video_tokens_not_divisible_are_refused(tiny_models: dict) -> None:
    """The shard hook names the video token count (text tokens never need to divide)."""
    adapter = get_adapter("mochi")(tiny_models["mochi"][0], dtype=torch.float32)
    transformer = adapter.load_transformer()
    adapter.install_sequence_parallel(transformer, _fake_sp(2))
    inputs = torch.load(tiny_models["mochi"][1])
    noisy = inputs["noisy"][:, :, :3, :6, :6]  # 3 latent frames x 3 x 3 patches = 27 video tokens
    with pytest.raises(ValueError, match=r"video token count \(27\) to be divisible"):
        with torch.no_grad():
            adapter.predict(transformer, noisy, inputs["timesteps"], inputs["cond"])
