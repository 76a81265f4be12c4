"""train/step_speed.py: the save_attention checkpoint policy and regional compilation, on a tiny Wan (CPU)."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from models_helpers import family_fixtures
from torch.utils._python_dispatch import TorchDispatchMode

from train import step_speed
from train.config import ConfigError, load_config
from train.config_schema import AttentionConfig
from train.models.wan import WanAdapter

FRAMES, HEIGHT, WIDTH = 17, 64, 64  # latents [B, 4, 5, 8, 8]: 80 video tokens
RADIAL = AttentionConfig(type="radial", block_size=16, backend="torch")
SVG2 = AttentionConfig(type="svg2", num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, kmeans_iters=1,
                       backend="torch")
DENSE = AttentionConfig(type="dense")

tiny_dir, adapter, encoders, lora_transformer = family_fixtures(WanAdapter)


class _OpCounter(TorchDispatchMode):
    """Counts the ops that really execute (below the checkpoint's caching modes, which answer saved ones)."""

    def __init__(self, ops: tuple) -> None:
        super().__init__()
        self.ops, self.counts = set(ops), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _batch(adapter: WanAdapter, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 5, 8, 8, generator=g), torch.randn(2, 4, 5, 8, 8, generator=g)
    noisy, timesteps, target = adapter.training_pair(latents, noise, torch.tensor([0.4, 0.7]))
    return noisy, timesteps, target, {"encoder_hidden_states": torch.randn(2, 24, 32, generator=g)}


def _step(adapter: WanAdapter, tr, cfg: AttentionConfig, policy: str | None, counter: _OpCounter | None = None):
    """One MSE forward/backward with the router of ``cfg`` and checkpointing ``policy`` (None: off)."""
    adapter.install_attention(tr, cfg, adapter.geometry(FRAMES, HEIGHT, WIDTH))
    step_speed.configure(tr, gradient_checkpointing=policy is not None, checkpoint_policy=policy or "full",
                         compile=False, device=torch.device("cpu"))
    if policy is None:
        tr.disable_gradient_checkpointing()
    tr.zero_grad(set_to_none=True)
    noisy, timesteps, target, cond = _batch(adapter)
    with counter if counter is not None else contextlib.nullcontext():
        loss = torch.nn.functional.mse_loss(adapter.predict(tr, noisy, timesteps, cond), target)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("cfg", [DENSE, RADIAL, SVG2], ids=["dense", "radial", "svg2"])
def test_save_attention_gives_the_same_loss_and_grads(adapter: WanAdapter, lora_transformer, cfg) -> None:
    # SVG2: fresh routers start cold from the same seeding and the recomputation replays the routing
    ref_loss, ref_grads = _step(adapter, lora_transformer, cfg, None)
    for policy in ("full", "save_attention"):
        loss, grads = _step(adapter, lora_transformer, cfg, policy)
        assert torch.equal(loss, ref_loss), policy
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], atol=1e-6, rtol=1e-5, msg=f"{policy}: {n}")


def test_save_attention_runs_each_dense_self_attention_once(adapter: WanAdapter, lora_transformer) -> None:
    # Dense routing: self-attention (router) and cross-attention (stock) both run the fused CPU SDPA op; the policy
    # keeps self-attention's output and recomputes the cheap cross-attention to the text.
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert sdpa in step_speed.attention_save_ops()
    layers = len(lora_transformer.blocks)
    counts = {}
    for policy in (None, "full", "save_attention"):
        counter = _OpCounter((sdpa,))
        _step(adapter, lora_transformer, DENSE, policy, counter)
        counts[policy] = counter.counts[sdpa]
    assert counts == {None: 2 * layers, "full": 4 * layers, "save_attention": 3 * layers}


def test_save_attention_runs_each_sparse_attention_once(adapter: WanAdapter, lora_transformer) -> None:
    ops = pytest.importorskip("sparse_attn.ops", reason="sparse_attn has no custom ops yet (issue 11)")
    save = tuple(ops.CHECKPOINT_SAVE_OPS)
    assert save and set(save) <= set(step_speed.attention_save_ops())
    layers = len(lora_transformer.blocks)
    counts = {}
    for policy in ("full", "save_attention"):
        counter = _OpCounter(save)
        _step(adapter, lora_transformer, RADIAL, policy, counter)
        counts[policy] = sum(counter.counts.values())
    assert counts["full"] == 2 * counts["save_attention"] and counts["save_attention"] >= layers


def test_saved_attention_bytes() -> None:
    # Wan2.1-1.3B at 321 frames, 480x832: 126,360 tokens, 12 heads x 128, 30 layers, bf16 out + fp32 LSE
    got = step_speed.saved_attention_bytes(126_360, 12, 128, 30)
    assert got == 30 * 126_360 * 12 * (128 * 2 + 4)
    assert 11.0 < got / 2**30 < 11.1


def test_policy_key_and_compile_switch() -> None:
    base = ["model.pretrained=some/model", "data.path=videos"]
    cfg = load_config(None, base)
    assert (cfg.train.checkpoint_policy, cfg.train.compile) == ("save_attention", None)
    assert load_config(None, [*base, "train.compile=true", "train.checkpoint_policy=full"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.checkpoint_policy: expected one of full, save_attention; got 'al"):
        load_config(None, [*base, "train.checkpoint_policy=all"])
    assert not step_speed.compile_enabled(None, torch.device("cpu"))
    assert step_speed.compile_enabled(None, torch.device("cuda"))
    assert not step_speed.compile_enabled(None, torch.device("cuda"), zero_stage=3)
    assert step_speed.compile_enabled(True, torch.device("cpu")) and not step_speed.compile_enabled(False, "cuda")
    with pytest.raises(ValueError, match="checkpoint_policy"):
        step_speed.checkpoint_function("some")


def test_compiled_blocks_break_only_at_the_router_and_compile_once(adapter: WanAdapter) -> None:
    """Regional compilation (aot_eager) of tiny Wans of 2 and 4 blocks under save_attention: the graph count does
    not grow with the blocks (the layer index is no guard), the only graph break is the router call, and loss and
    gradients equal the eager ones."""
    import torch._dynamo
    from models_helpers import add_lora
    from torch._dynamo.utils import counters

    base = adapter.load_transformer()
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        tr = add_lora(type(base).from_config({**base.config, "num_layers": layers}), adapter.default_lora_targets)
        loss_e, grads_e = _step(adapter, tr, RADIAL, "save_attention")
        assert step_speed.compile_repeated_blocks(tr, backend="aot_eager") == layers
        loss_c, grads_c = _step(adapter, tr, RADIAL, "save_attention")
        graphs[layers] = counters["stats"]["unique_graphs"]
        breaks = list(counters["graph_break"])
        assert breaks and all("RouterAttnProcessor.attend" in r for r in breaks), breaks
        torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-5)
        for n, g in grads_e.items():
            torch.testing.assert_close(grads_c[n], g, atol=1e-5, rtol=1e-4)
    assert 0 < graphs[4] == graphs[2], graphs
    torch._dynamo.reset()


def test_train_step_benchmark_runs_the_trainer_on_cpu(tmp_path, capsys) -> None:
    """benchmarks/train_step.py --tiny: two Trainer runs (full / save_attention) from a latent cache, one table."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--impls", "radial,sparse"])
    assert exc.value.code == 2 and "error: --impls: unknown ['sparse']" in capsys.readouterr().err
    out = tmp_path / "table.md"
    bench.main(["--tiny", "--impls", "radial", "--modes", "base,policy", "--warmup", "0", "--steps", "1",
                "--work", str(tmp_path / "work"), "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| wan-1.3b | 9 |")]
    assert len(rows) == 2 and "| radial | full | off |" in rows[0] and "| radial | save_attention | off |" in rows[1]
    assert not list((tmp_path / "work").glob("run-*"))  # run folders are removed, the cache stays
    assert (tmp_path / "work" / "cache-wan-1.3b-9" / "manifest.json").is_file()


def test_trainer_losses_do_not_depend_on_the_checkpoint_policy(tmp_path) -> None:
    """Through the Trainer (SVG2, whose recomputation replays the routing): no checkpointing, full and
    save_attention give the same losses, and the trainer reports what it set up."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from data.synthetic import write_synthetic_dataset
    from train.trainer import Trainer

    model = WanAdapter.save_tiny_random(str(tmp_path / "model"), seed=0)
    data = write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13, height=32, width=32, fps=16)
    losses = {}
    for policy in (None, "full", "save_attention"):
        cfg = load_config(None, [
            f"model.pretrained={model}", f"data.path={data}", "data.frames=9", "data.height=32", "data.width=32",
            "data.fps=16", "data.num_workers=0", f"train.output_dir={tmp_path / str(policy)}", "train.max_steps=2",
            "train.learning_rate=1e-3", "train.mixed_precision=no", "attention.type=svg2", "attention.block_size=16",
            "attention.backend=torch", "attention.num_q_clusters=4", "attention.num_k_clusters=8",
            "attention.kmeans_iters=1", "lora.rank=4", "lora.alpha=4", "tracking.report_to=none",
            f"train.gradient_checkpointing={str(policy is not None).lower()}",
            f"train.checkpoint_policy={policy or 'save_attention'}",
        ])
        trainer = Trainer(cfg)
        losses[policy] = trainer.run().losses
        assert trainer.step_speed == {"checkpointing": policy, "compiled_blocks": 0}  # CPU: compile off by default
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    assert losses["full"] == pytest.approx(losses[None], rel=1e-6)
    assert losses["save_attention"] == pytest.approx(losses[None], rel=1e-6)


@pytest.mark.parametrize("cfg", [DENSE, RADIAL, SVG2], ids=["dense", "radial", "svg2"])
def test_router_bnhd_layout_equals_the_transposed_call(cfg) -> None:
    """layout="bnhd" (what Wan's processor hands over: no transpose copies): the same numbers and gradients as the
    [B, H, N, D] call, returned as [B, N, H, D]; radial writes that layout directly."""
    from train.attention import AttentionRouter
    from train.geometry import VideoGeometry

    geometry = VideoGeometry(frames=17, height=64, width=64, latent_frames=5, latent_height=8, latent_width=8,
                             tokens_per_frame=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 80, 4, 16, generator=g, requires_grad=True) for _ in range(3))  # [B, N, H, D]
    results = []
    for layout in ("bhnd", "bnhd"):
        router = AttentionRouter(cfg, geometry, radial_rule="wan")
        router.begin_step()
        args = (q, k, v) if layout == "bnhd" else (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = router(1, *args, layout=layout)
        out = out if layout == "bnhd" else out.transpose(1, 2)
        assert out.shape == q.shape
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), (q, k, v))
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    if cfg is RADIAL:
        router = AttentionRouter(cfg, geometry, radial_rule="wan")
        assert router(1, q, k, v, layout="bnhd").is_contiguous()  # written in [B, N, H, D]
    with pytest.raises(ValueError, match="layout must be 'bhnd' or 'bnhd'"):
        AttentionRouter(cfg, geometry, radial_rule="wan")(1, q, k, v, layout="nhd")
