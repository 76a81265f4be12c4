"""Public block-sparse attention op: argument validation, backend dispatch, autograd.

``block_sparse_attention(q, k, v, block_mask)`` computes softmax attention in which query block ``i`` sees
only the key blocks ``j`` with ``block_mask[..., i, j]`` True (blocks of ``block_size`` tokens; the last
block may be partial and is exact).  Three backends compute the same function:

* ``"fa4"`` - FlashAttention-4's block-sparse kernels (optional ``flash-attn-4``, ``sparse_attn/backends/fa4.py``):
  Hopper/Blackwell, fp16/bf16, D in {64, 128}, 128-token blocks; the fastest where it runs;

* ``"triton"`` - fused Triton kernels (``sparse_attn/kernels/block_sparse.py``) for the forward and the
  backward; CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests);
* ``"torch"`` - pure PyTorch (``sparse_attn/reference.py``), any device, explicit forward/backward.

Both run inside the custom ops of ``sparse_attn/ops.py`` (autograd, ``torch.compile``, selective checkpointing).

``key_padding_mask`` (bool ``[B, N]``, True = valid key) removes keys from every softmax - the padded text
tokens of joint text+video attention.  A query row with no valid key returns zeros and zero gradients.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .backends import fa4
from .interpreter import interpreting

__all__ = ["block_sparse_attention"]

_BACKENDS = ("auto", "fa4", "triton", "torch")
_TRITON_HEAD_DIMS = (64, 128)
_TRITON_BLOCK_SIZES = (64, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q, k, v, block_mask, block_size, scale, backend, key_padding_mask) -> tuple[int, float]:
    """Check every argument; returns ``(Nb, scale)``.  Raises TypeError/ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape [B, H, N, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _TORCH_DTYPES:
        raise TypeError(f"q, k, v must be float16, bfloat16, float32 or float64; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    bsz, heads, n_ctx, head_dim = q.shape
    if n_ctx == 0 or head_dim == 0:
        raise ValueError(f"q must have N > 0 and D > 0, got shape {tuple(q.shape)}")

    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 16:
        raise ValueError(f"block_size must be >= 16, got {block_size}")
    nb = math.ceil(n_ctx / block_size)

    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a bool torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}, got {block_mask.device}")
    expected = f"[{nb}, {nb}], [Hm, {nb}, {nb}] or [{bsz}, Hm, {nb}, {nb}] with Hm in {{1, {heads}}} (Nb = ceil(N={n_ctx} / block_size={block_size}))"
    shape = tuple(block_mask.shape)
    ok = block_mask.dim() in (2, 3, 4) and shape[-2:] == (nb, nb)
    if ok and block_mask.dim() >= 3:
        ok = shape[-3] in (1, heads)
    if ok and block_mask.dim() == 4:
        ok = shape[0] == bsz
    if not ok:
        raise ValueError(f"block_mask must have shape {expected}; got {shape}")

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor [B, N] or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (bsz, n_ctx):
            raise ValueError(f"key_padding_mask must have shape [B, N] = [{bsz}, {n_ctx}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    return nb, float(scale)


def _triton_reason(q: torch.Tensor, block_size: int) -> tuple[type, str] | None:
    """Why our Triton kernels cannot run this call, or None."""
    head_dim = q.shape[-1]
    if head_dim not in _TRITON_HEAD_DIMS:
        return ValueError, f"supports head dim D in {_TRITON_HEAD_DIMS}, got D={head_dim}; use backend='torch'"
    if block_size not in _TRITON_BLOCK_SIZES:
        return ValueError, f"supports block_size in {_TRITON_BLOCK_SIZES}, got {block_size}; use backend='torch'"
    if q.dtype not in _TRITON_DTYPES:
        return TypeError, f"supports q/k/v dtypes float16, bfloat16, float32; got {q.dtype}"
    if not q.is_cuda and not interpreting():
        return ValueError, "needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); use backend='torch'"
    if not q.is_cuda and q.dtype == torch.bfloat16:  # the interpreter computes bf16 as raw integers
        return TypeError, "on CPU (TRITON_INTERPRET=1) gives wrong bf16 results; use float16/float32 or backend='torch'"
    return None


def _resolve_backend(backend: str, q: torch.Tensor, block_size: int, deterministic: bool) -> str:
    """The backend that runs this call (``q`` as ``[B, H, N, D]``).

    ``auto``: torch on CPU; on CUDA FlashAttention-4 when installed and it supports the GPU / dtype / head dim /
    block size and bit-reproducible gradients are not asked for (its dQ uses atomics), else our Triton kernels
    when they cover the shape, else torch.  An explicit backend that cannot run raises one error saying why.
    """
    if backend == "auto":
        if not q.is_cuda:
            return "torch"
        if not deterministic and fa4.unsupported_reason(q, block_size) is None:
            return "fa4"
        return "triton" if _triton_reason(q, block_size) is None else "torch"
    if backend == "fa4" and deterministic:
        # measured on an H200 with flash-attn-4 4.0.0b36: its block-sparse backward asserts
        # "Deterministic not implemented for block-sparse backward"
        raise ValueError("backend='fa4' has no deterministic block-sparse backward (FlashAttention-4 accumulates dQ "
                         "with atomics); use backend='triton' or 'auto' for bit-reproducible gradients")
    if backend in ("fa4", "triton"):
        reason = fa4.unsupported_reason(q, block_size) if backend == "fa4" else _triton_reason(q, block_size)
        if reason is not None:
            exc, why = reason
            raise exc(f"backend='{backend}' {why}" if backend == "triton" else f"backend='fa4': {why}")
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    layout: str = "bhnd",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention, differentiable w.r.t. ``q``, ``k``, ``v``.

    Args:
        q, k, v: ``[B, H, N, D]`` (the layout of ``F.scaled_dot_product_attention``), any strides, one dtype.
        block_mask: bool ``[Nb, Nb]``, ``[Hm, Nb, Nb]`` or ``[B, Hm, Nb, Nb]``, ``Hm`` in {1, H},
            ``Nb = ceil(N / block_size)``; True = the (query block, key block) pair is computed.  Its sparse
            index form is cached on the tensor (identity + version), so pass the same tensor every layer.
        block_size: tokens per block.  Triton: 64 or 128; torch: any value >= 16.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"fa4"``, ``"triton"``, ``"torch"`` or ``"auto"``: on CUDA FA4 where it runs (installed,
            sm90/sm100, fp16/bf16, D in {64, 128}, block_size 128) unless ``deterministic``, else Triton (D in
            {64, 128}, block_size in {64, 128}, fp16/bf16/fp32), else torch; torch on CPU.
        key_padding_mask: optional bool ``[B, N]``, True = valid key; invalid keys never enter a softmax.
        layout: ``"bhnd"`` (q/k/v/out are ``[B, H, N, D]``) or ``"bnhd"`` (``[B, N, H, D]``, as diffusers'
            processors hold them before their transpose): no copy either way.
        deterministic: bit-reproducible gradients (``None`` = ``torch.are_deterministic_algorithms_enabled()``):
            ``auto`` then never picks FA4 (its SM90 dQ accumulates with atomics; Triton's dQ pass does not),
            and an explicit ``backend="fa4"`` is refused (FA4 has no deterministic block-sparse backward).

    Runs as the custom op ``sparse_attn::block_sparse_fwd`` (see :mod:`sparse_attn.ops`): ``torch.compile``
    does not break its graph here, and ``ops.CHECKPOINT_SAVE_OPS`` names it for selective checkpointing.

    Returns:
        ``[B, H, N, D]`` (``[B, N, H, D]`` for ``layout="bnhd"``), contiguous, in ``q``'s dtype.  Query rows
        without any valid key are 0 (with zero gradients).
    """
    if layout not in ops.LAYOUTS:
        raise ValueError(f"layout must be one of {ops.LAYOUTS}, got {layout!r}")
    q4, k4, v4 = (ops._bhnd(x, layout) if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in (q, k, v))
    _, scale = _validate(q4, k4, v4, block_mask, block_size, scale, backend, key_padding_mask)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    backend = _resolve_backend(backend, q4, block_size, bool(deterministic))
    out, _ = ops.block_sparse_fwd(
        q, k, v, block_mask, key_padding_mask, None, None, None, None, block_size, scale, backend, layout, bool(deterministic)
    )
    return out
