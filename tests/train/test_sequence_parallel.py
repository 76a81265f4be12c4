"""Ulysses sequence parallelism: 2 processes on gloo reproduce the single-process loss and gradients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.config_schema import AttentionConfig
from train.models import get_adapter

FRAMES, SIZE = 9, 64  # 3 latent frames x 16 tokens = 48 tokens, 2 heads: divisible by 2


def _inputs(text_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "hidden_states": torch.randn(1, 4, 3, SIZE // 8, SIZE // 8, generator=g),
        "timestep": torch.tensor([400.0]),
        "encoder_hidden_states": torch.randn(1, 7, text_dim, generator=g),
        "target": torch.randn(1, 4, 3, SIZE // 8, SIZE // 8, generator=g),
    }


def _loss_and_grads(model_dir: str, attention: str, sp_size: int, rank: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    adapter = get_adapter("wan")(model_dir, dtype=torch.float32)
    transformer = adapter.load_transformer().float()
    geometry = adapter.geometry(FRAMES, SIZE, SIZE)
    router = adapter.install_attention(transformer, AttentionConfig(type=attention, block_size=16, backend="torch"), geometry)
    scale = 1
    if sp_size > 1:
        from train import sequence_parallel

        sp = sequence_parallel.SequenceParallel.create(sp_size)
        sequence_parallel.install("wan", transformer, sp)
        router.sequence_parallel = sp
        scale = sp.size
    x = _inputs(transformer.config.text_dim)
    out = transformer(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, x["target"])
    (loss * scale).backward()
    grads = {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if p.grad is not None}
    if sp_size > 1:  # what DDP does: average over all ranks
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return float(loss), grads


def _worker(rank: int, world: int, port: int, model_dir: str, attention: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        loss, grads = _loss_and_grads(model_dir, attention, sp_size=world, rank=rank)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> str:
    return get_adapter("wan").save_tiny_random(str(tmp_path_factory.mktemp("sp") / "wan"), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "radial"])
def test_sp2_matches_single_process(tiny_wan: str, attention: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref_loss, ref_grads = _loss_and_grads(tiny_wan, attention, sp_size=1)
    out = str(tmp_path / "sp.pt")
    mp.spawn(_worker, args=(2, _free_port(), tiny_wan, attention, out), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert set(got["grads"]) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_other_families_are_refused_clearly() -> None:
    from train import sequence_parallel

    sp = sequence_parallel.SequenceParallel(size=2, rank=0, dp_rank=0, dp_size=1, group=None)
    with pytest.raises(ValueError, match="model.family=wan only"):
        sequence_parallel.install("mochi", torch.nn.Linear(2, 2), sp)
