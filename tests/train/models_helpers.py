"""What the model-family adapter tests (test_models_*.py) share: tiny-pipeline fixtures, LoRA set-up, one
training step through the router, and the checks every family's router processors must pass alike.

The checks take ``step(cfg, *, checkpointing) -> (loss, lora grads, router)``: the family's own training step
(latents, text conditioning) with the router of ``cfg`` installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import LoraConfig

from train.config_schema import AttentionConfig

CPU = torch.device("cpu")
DENSE = AttentionConfig(type="dense")
SPARSE = {
    "radial": AttentionConfig(type="radial", block_size=16, backend="torch"),
    "svg2": AttentionConfig(type="svg2", num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0,
                            kmeans_iters=2, backend="torch"),
}
Step = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor], Any]]


# -- fixtures ------------------------------------------------------------------------------------------------
def family_fixtures(adapter_cls: type, *, text: int | None = None) -> tuple:
    """Module-scoped ``tiny_dir``, ``adapter`` (float32; ``max_sequence_length = text`` when given) and
    ``encoders`` fixtures, and the function-scoped ``lora_transformer``; assign them to those names."""

    @pytest.fixture(scope="module")
    def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
        return adapter_cls.save_tiny_random(str(tmp_path_factory.mktemp(adapter_cls.family) / "tiny"), seed=0)

    @pytest.fixture(scope="module")
    def adapter(tiny_dir: str):
        a = adapter_cls(tiny_dir, dtype=torch.float32)
        if text is not None:
            a.max_sequence_length = text
        return a

    @pytest.fixture(scope="module")
    def encoders(adapter):
        return adapter.load_encoders(CPU)

    @pytest.fixture()
    def lora_transformer(adapter):
        tr = add_lora(adapter.load_transformer(), adapter.default_lora_targets)
        assert not any(p.requires_grad for n, p in tr.named_parameters() if "lora" not in n)
        return tr

    return tiny_dir, adapter, encoders, lora_transformer


def cond_fixture(prompts: list[str]):
    """Module-scoped ``cond`` fixture: the adapter's text conditioning of ``prompts``."""

    @pytest.fixture(scope="module")
    def cond(adapter, encoders) -> dict:
        return adapter.encode_prompts(encoders, prompts)

    return cond


def config_only_pipeline(path: Path, pipeline_class: str, **components: type) -> str:
    """A pipeline folder of real-size configs and no weights: ``model_index.json`` naming ``pipeline_class``
    and each component's default config in its subfolder (geometry needs only those)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        for subfolder, cls in components.items():
            cls().save_config(path / subfolder)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return str(path)


# -- training steps ------------------------------------------------------------------------------------------
def add_lora(transformer: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    with torch.no_grad():  # non-zero B: the LoRA path changes the output and every A gets a gradient
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return transformer


def training_batch(adapter, latent: tuple, b: int = 2, seed: int = 0):
    """(noisy, timesteps, target) of ``b`` random latents of shape ``latent``, noise levels 0.3 ... 0.8."""
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(b, *latent, generator=g), torch.randn(b, *latent, generator=g)
    return adapter.training_pair(latents, noise, torch.linspace(0.3, 0.8, b))


def loss_and_grads(adapter, tr, cfg: AttentionConfig, geometry, batch: tuple, cond: dict, *, checkpointing: bool):
    """Router of ``cfg`` installed at ``geometry``, one MSE forward/backward on ``batch`` = (noisy, timesteps,
    target): (loss, {name: grad} of the LoRA parameters that got one, router)."""
    router = adapter.install_attention(tr, cfg, geometry)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    else:
        tr.disable_gradient_checkpointing()
    tr.zero_grad(set_to_none=True)
    noisy, timesteps, target = batch
    loss = torch.nn.functional.mse_loss(adapter.predict(tr, noisy, timesteps, cond), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.named_parameters() if "lora" in n and p.grad is not None}
    return loss.detach(), grads, router


def joint_step(adapter, tr, cond: dict, latent: tuple) -> Step:
    """The training step of the joint-attention families (HunyuanVideo, Mochi): :func:`training_batch` of
    ``latent`` with ``cond``, the router at the latents' geometry."""

    def step(cfg: AttentionConfig, *, checkpointing: bool):
        geometry = adapter.geometry_from_latents(latent)
        return loss_and_grads(adapter, tr, cfg, geometry, training_batch(adapter, latent), cond,
                              checkpointing=checkpointing)

    return step


# -- checks --------------------------------------------------------------------------------------------------
def check_sparse_step_gives_finite_lora_grads(step: Step, n_lora: int) -> None:
    """Radial and SVG2 under gradient checkpointing: a finite non-zero gradient for each of the ``n_lora``
    LoRA parameters, a density in (0, 1), one router step, and a loss other than the dense one."""
    dense_loss, _, _ = step(DENSE, checkpointing=False)
    for name, cfg in SPARSE.items():
        loss, grads, router = step(cfg, checkpointing=True)
        assert len(grads) == n_lora, name
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), name
        assert 0.0 < router.density() < 1.0, name
        assert router.step == 1, name  # checkpoint recomputation does not start a step
        assert not torch.allclose(loss, dense_loss), name  # the sparse path really ran


def check_all_true_radial_mask_gives_the_dense_loss(step: Step, block_size: int) -> None:
    """A radial mask of one block covering every token is all True: dense loss and gradients."""
    dense_loss, dense_grads, _ = step(DENSE, checkpointing=False)
    loss, grads, router = step(AttentionConfig(type="radial", block_size=block_size, backend="torch"),
                               checkpointing=True)
    assert router.density() == 1.0
    torch.testing.assert_close(loss, dense_loss, atol=1e-6, rtol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, dense_grads[n], atol=1e-6, rtol=1e-4)


def check_triton_radial_matches_torch(step: Step) -> None:
    """Radial attention at block 64 through the Triton kernels (the interpreter on CPU) and the torch path:
    the same loss and LoRA gradients."""
    results = {}
    for backend in ("torch", "triton"):
        cfg = AttentionConfig(type="radial", block_size=64, backend=backend)
        results[backend] = step(cfg, checkpointing=False)
    (loss_t, grads_t, router), (loss_k, grads_k, _) = results["torch"], results["triton"]
    assert 0.0 < router.density() < 1.0
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-4)
    assert grads_k.keys() == grads_t.keys() and grads_t
    for n, g in grads_t.items():
        torch.testing.assert_close(grads_k[n], g, atol=1e-5, rtol=1e-3)


def sparse_pipeline(adapter, encoders, geometry):
    """The family's pipeline around a transformer with radial processors (first layer dense): (pipe, router)."""
    tr = adapter.load_transformer()
    cfg = AttentionConfig(type="radial", block_size=16, dense_layers=1, backend="torch")
    router = adapter.install_attention(tr, cfg, geometry)
    pipe = adapter.load_pipeline(transformer=tr, encoders=encoders)
    assert pipe.transformer is tr
    return pipe, router


@pytest.fixture(autouse=True)
def fresh_accelerate_state():  # autouse in the modules that import it
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
