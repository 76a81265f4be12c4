"""Step-level speed of training: selective activation checkpointing that keeps attention, and regional compilation.

Checkpointing (``train.gradient_checkpointing``, ``train.checkpoint_policy``). Full checkpointing recomputes a
whole transformer block during backward, attention included - at 321 frames that second attention forward is
a quarter of the step. ``checkpoint_policy: save_attention`` hands the model's own extension point
(``ModelMixin.enable_gradient_checkpointing(gradient_checkpointing_func=...)``) a non-reentrant
``torch.utils.checkpoint`` whose ``context_fn`` is a selective-checkpoint policy: the outputs of the attention
ops of self-attention (the sparse op's :data:`sparse_attn.ops.CHECKPOINT_SAVE_OPS` and the fused dense SDPA ops -
flash, efficient, cuDNN, CPU flash - when query and key have one shape) are MUST_SAVE, everything else (cross-attention
to the text included) is recomputed. During the recomputation the block's Python
runs again (projections, norms, RoPE, the router's bookkeeping and SVG2's routing replay) but the attention ops
return their saved outputs, so the attention kernels run once forward and once backward. The price is the
saved output + LSE of every checkpointed attention: ``B*N*H*D`` elements in the activation dtype plus
``B*H*N`` fp32 per layer (:func:`saved_attention_bytes`).

Compilation (``train.compile``). Regional: every repeated transformer block is ``torch.compile``d on its own
(diffusers' ``compile_repeated_blocks`` where the model declares ``_repeated_blocks``, else the adapter's
``repeated_blocks`` class names), so one compile serves all blocks. The router's call sits behind
``torch.compiler.disable`` (``RouterAttnProcessor.attend``): its Python state - mask cache, step counting, SVG2
clustering and replay, sequence-parallel exchanges - runs eagerly, and each block compiles into the graph before
attention (norms, modulation, q/k/v projections, RMSNorm, RoPE) and the graph after it (output projection,
cross-attention, FFN, residuals). That one graph break per block is the honest price of keeping the router's
state out of traced code; the attention kernel itself is a single op either way.

Checkpointing stays eager around the compiled blocks (the compiled graphs run inside the checkpoint), which
works with graph breaks; whether torch runs compiled regions under a selective-checkpoint context depends on
the torch version, so :func:`compiled_regions_run_under_sac` probes it once and a warning says when the blocks
would fall back to eager.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = [
    "CHECKPOINT_POLICIES",
    "attention_save_ops",
    "checkpoint_function",
    "compile_enabled",
    "compile_repeated_blocks",
    "compiled_regions_run_under_sac",
    "configure",
    "configure_for_trainer",
    "describe_memory",
    "saved_attention_bytes",
]

#: ``train.checkpoint_policy`` values.
CHECKPOINT_POLICIES = ("full", "save_attention")

#: Fused dense attention ops whose outputs (and LSE, RNG state) their backward takes: saved under
#: ``save_attention``. The math fallback of SDPA decomposes into matmuls and softmax and is recomputed.
_DENSE_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def attention_save_ops() -> tuple[Any, ...]:
    """OpOverloads whose outputs ``save_attention`` keeps: the dense SDPA ops this torch has, and the sparse
    attention ops ``sparse_attn`` exports (none when this ``sparse_attn`` predates its custom ops)."""
    ops = [getattr(torch.ops.aten, name).default for name in _DENSE_ATTENTION_OPS if hasattr(torch.ops.aten, name)]
    try:
        from sparse_attn.ops import CHECKPOINT_SAVE_OPS
    except ModuleNotFoundError:  # sparse_attn without torch.library ops: its attention is recomputed
        CHECKPOINT_SAVE_OPS = ()
    return tuple(ops) + tuple(CHECKPOINT_SAVE_OPS)


def _policy(save: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """MUST_SAVE for the attention ops in ``save`` - self-attention only: a query and key of one shape. Cross-attention
    to the text (Wan's ``attn2``: N queries, 512 keys) costs little to recompute while its output is as large as
    self-attention's, so it is recomputed."""
    if op in save and len(args) > 1 and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor):
        if args[0].shape == args[1].shape:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_function(policy: str) -> Callable[..., Any]:
    """The ``gradient_checkpointing_func`` diffusers calls as ``fn(block, *args)`` for ``policy``."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"train.checkpoint_policy must be one of {list(CHECKPOINT_POLICIES)}, got {policy!r}")
    context_fn = None
    if policy == "save_attention":
        context_fn = functools.partial(
            create_selective_checkpoint_contexts, functools.partial(_policy, frozenset(attention_save_ops()))
        )

    def gradient_checkpointing_func(module: nn.Module, *args: Any) -> Any:
        if context_fn is None:
            return checkpoint(module.__call__, *args, use_reentrant=False)
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)

    gradient_checkpointing_func.policy = policy  # type: ignore[attr-defined]
    return gradient_checkpointing_func


def saved_attention_bytes(
    tokens: int, heads: int, head_dim: int, layers: int, *, batch: int = 1, dtype_bytes: int = 2
) -> int:
    """Extra activation memory of ``save_attention``: per checkpointed attention layer the output
    ``[B, N, H, D]`` in the activation dtype and the fp32 LSE ``[B, H, N]``."""
    return layers * batch * tokens * heads * (head_dim * dtype_bytes + 4)


# -- compilation -----------------------------------------------------------------------------------------------


def compile_enabled(setting: Optional[bool], device: torch.device, *, zero_stage: int = 0) -> bool:
    """``train.compile``: true/false as given; null (auto) compiles on CUDA except under ZeRO-3 (whose
    parameter-gathering hooks run inside every block) and never on CPU."""
    if setting is not None:
        return bool(setting)
    return torch.device(device).type == "cuda" and zero_stage != 3


def _block_class_names(model: nn.Module, fallback: Sequence[str]) -> tuple[str, ...]:
    return tuple(getattr(model, "_repeated_blocks", None) or fallback)


def compile_repeated_blocks(model: nn.Module, fallback_blocks: Sequence[str] = (), **compile_kwargs: Any) -> int:
    """``torch.compile`` each repeated block of ``model`` in place (regional compilation); returns how many.

    Uses diffusers' ``ModelMixin.compile_repeated_blocks`` when the class declares ``_repeated_blocks``
    (Wan, HunyuanVideo); otherwise compiles the modules whose class name is in ``fallback_blocks`` the same
    way (Mochi declares none in diffusers 0.42)."""
    names = _block_class_names(model, fallback_blocks)
    if not names:
        raise ValueError(f"{type(model).__name__} declares no repeated blocks to compile")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"none of the blocks {list(names)} is in {type(model).__name__}")
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(**compile_kwargs)
    else:
        for block in blocks:
            block.compile(**compile_kwargs)
    return len(blocks)


@functools.lru_cache(maxsize=None)
def compiled_regions_run_under_sac() -> bool:
    """Whether this torch runs a compiled region inside a selective-checkpoint context (rather than skipping
    it: Dynamo skips frames while a dispatch mode that does not ignore compile internals is active). Probed
    once with a one-op function on the CPU and the eager backend."""
    import torch._dynamo

    eager_runs: list[bool] = []

    def body(x: torch.Tensor) -> torch.Tensor:
        eager_runs.append(not torch.compiler.is_compiling())  # False when traced (Dynamo replays the append)
        return x.sin()

    compiled = torch.compile(body, backend="eager", fullgraph=True)
    context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, frozenset()))
    x = torch.ones(2, requires_grad=True)
    try:
        checkpoint(compiled, x, use_reentrant=False, context_fn=context_fn).sum().backward()
    except Exception:  # noqa: BLE001 - any failure means "does not work here"
        return False
    finally:
        torch._dynamo.reset()
    return bool(eager_runs) and not any(eager_runs)  # forward and recomputation both ran compiled code


# -- the trainer's entry point ---------------------------------------------------------------------------------


def configure(
    transformer: nn.Module,
    *,
    gradient_checkpointing: bool,
    checkpoint_policy: str,
    compile: Optional[bool],
    device: torch.device,
    fallback_blocks: Iterable[str] = (),
    zero_stage: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Checkpointing with ``checkpoint_policy`` (when ``gradient_checkpointing``) and regional compilation
    (when :func:`compile_enabled`) on ``transformer``; returns what was set up (for logs and benchmarks)."""
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"train.checkpoint_policy must be one of {list(CHECKPOINT_POLICIES)}, got {checkpoint_policy!r}")
    from train.models.common import unwrap

    model = unwrap(transformer)
    done: dict[str, Any] = {"checkpointing": None, "compiled_blocks": 0}
    if gradient_checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(checkpoint_policy))
        done["checkpointing"] = checkpoint_policy
    if compile_enabled(compile, device, zero_stage=zero_stage):
        if gradient_checkpointing and checkpoint_policy == "save_attention" and not compiled_regions_run_under_sac():
            warnings.warn(
                f"torch {torch.__version__} skips compiled regions inside selective checkpointing: the blocks run "
                "eagerly; set train.checkpoint_policy=full or train.compile=false to choose which one to keep",
                stacklevel=2,
            )
        done["compiled_blocks"] = compile_repeated_blocks(model, tuple(fallback_blocks))
        log(f"regional compilation: {done['compiled_blocks']} blocks of {type(model).__name__} (torch.compile)")
    return done


def configure_for_trainer(transformer: nn.Module, train_cfg: Any, adapter: Any, accelerator: Any,
                          log: Callable[[str], None], *, sequence_parallel_size: int = 1) -> dict[str, Any]:
    """:func:`configure` from the recipe's ``train`` section and the run's accelerator (device, ZeRO stage).

    Under sequence parallelism ``save_attention`` falls back to ``full``: the all-gathers inside a checkpointed
    block (HunyuanVideo's text heads on gloo) broke selective checkpointing's replay ("aten.cat.out encountered
    during backward but not found in storage", tests/test_e2e_recipes.py), so SP runs recompute attention."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    policy = train_cfg.checkpoint_policy
    if train_cfg.gradient_checkpointing and policy == "save_attention" and sequence_parallel_size > 1:
        log("train.checkpoint_policy: save_attention is not used with sequence parallelism; using full")
        policy = "full"
    return configure(
        transformer,
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        checkpoint_policy=policy,
        compile=train_cfg.compile,
        device=accelerator.device,
        fallback_blocks=getattr(adapter, "repeated_blocks", ()),
        zero_stage=int(plugin.zero_stage) if plugin is not None else 0,
        log=log,
    )


def describe_memory(tokens: int, heads: int, head_dim: int, layers: int, batch: int = 1) -> str:
    """One line: the extra memory ``save_attention`` keeps for these shapes (bf16 activations)."""
    gib = saved_attention_bytes(tokens, heads, head_dim, layers, batch=batch) / 2**30
    return f"save_attention keeps {gib:.2f} GiB of attention outputs + LSE ({layers} layers x {tokens} tokens)"

