"""Ulysses sequence parallelism: each rank of a group holds 1/P of the tokens, except inside attention.

Around attention an all-to-all turns "all heads, 1/P of the sequence" into "1/P of the heads, the whole
sequence", so the radial mask applies unchanged and SVG2's per-head clusters stay local to a rank; a second
all-to-all turns it back. Everything else in a block (norms, projections, FFN, cross-attention to text) works
per token on the local shard.

Text tokens of joint attention (HunyuanVideo, Mochi) are not sharded: every rank of the group holds all of them
(they are few: 256 against tens of thousands of video tokens). Inside attention a rank uses its head slice of
the replicated text q, k, v next to its head slice of the all-to-all'd video tokens; the text output heads are
then all-gathered so every rank again holds the whole text stream.

Autograd convention. All ranks of a group compute the same replicated parts (patch embedding, conditioning,
unpatchify, the loss) on the same sample. Entering the blocks, each rank keeps its slice of the tokens
(backward: the gradient of its slice only); leaving them, the slices are all-gathered (backward: again just the
local slice, since every rank holds the same full gradient). Every parameter gradient on a rank is then the
contribution of its own tokens, and the sum over the group is the full gradient. Data parallelism averages over
all W = P x D ranks, so the trainer multiplies the loss by P before backward (the logged loss is unscaled).

Replicated tensors (text stream, conditioning) follow the same bookkeeping: a rank's gradient of a replicated
tensor is the share its own consumers contribute, and the group's sum is the full gradient. Hence entering a
rank-local computation a replicated tensor is just sliced (the text heads: gradient for this rank's slice only),
and leaving it the slices are all-gathered with the standard backward, the sum over the group of the partial
gradients, restricted to the local slice (every rank's downstream replicated text consumes the gathered heads
but contributes only its share of their gradient).

Families are wired in through forward hooks on their own modules (torch's extension point), never by editing
library source: each adapter's ``sequence_parallel_hooks`` (``train/models/``) registers the hooks built here, and
``ModelAdapter.install_sequence_parallel`` is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class SequenceParallel:
    size: int
    rank: int  # rank inside the sequence group
    dp_rank: int  # index of the group = data-parallel rank
    dp_size: int
    group: Any

    @classmethod
    def create(cls, size: int) -> "SequenceParallel":
        """Split the world into consecutive groups of ``size`` ranks (call on every rank)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel.sequence_parallel_size > 1 needs a distributed launch (accelerate launch --num_processes N)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % size != 0:
            raise ValueError(f"parallel.sequence_parallel_size={size} must divide the number of processes ({world})")
        mine = None
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                mine = group
        return cls(size=size, rank=rank % size, dp_rank=rank // size, dp_size=world // size, group=mine)

    # -- token sharding ------------------------------------------------------------------------------------------
    def check_divisible(self, tokens: int, heads: int) -> None:
        if tokens % self.size:
            raise ValueError(
                f"sequence parallelism needs the video token count ({tokens}) to be divisible by "
                f"parallel.sequence_parallel_size={self.size}; change data.frames/height/width or the group size"
            )
        if heads % self.size:
            raise ValueError(f"the model's {heads} attention heads are not divisible by parallel.sequence_parallel_size={self.size}")

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _Shard.apply(x, dim, self)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _Gather.apply(x, dim, self)

    # -- attention ------------------------------------------------------------------------------------------------
    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N/P, D] (all heads, local tokens) -> [B, H/P, N, D] (local heads, all tokens)."""
        return _AllToAll.apply(x, self, True)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H/P, N, D] -> [B, H, N/P, D]."""
        return _AllToAll.apply(x, self, False)

    def local_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] replicated -> this rank's heads [B, H/P, N, D] (the head group seq_to_heads gives it).

        A plain slice: its gradient reaches this rank's heads only (the rank's share of a replicated tensor)."""
        h = x.shape[1] // self.size
        return x.narrow(1, self.rank * h, h)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H/P, N, D] (this rank's heads) -> [B, H, N, D] on every rank; backward sums the group's partial
        gradients of the local heads."""
        return _GatherHeads.apply(x, self)


def _all_to_all(x: torch.Tensor, sp: SequenceParallel, seq_to_heads: bool) -> torch.Tensor:
    p = sp.size
    b, h, n, d = x.shape
    if seq_to_heads:  # send head group j to rank j; receive every rank's token slice of my head group
        send = x.reshape(b, p, h // p, n, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)
    send = x.reshape(b, h, p, n // p, d).permute(2, 0, 1, 3, 4).contiguous()  # token slice j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * h, n // p, d)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallel, seq_to_heads: bool) -> torch.Tensor:
        ctx.sp, ctx.direction = sp, seq_to_heads
        return _all_to_all(x, sp, seq_to_heads)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _all_to_all(grad.contiguous(), ctx.sp, not ctx.direction), None, None


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
        ctx.dim, ctx.sp, ctx.full = dim, sp, x.shape[dim]
        return x.chunk(sp.size, dim=dim)[sp.rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.full
        out = grad.new_zeros(shape)
        out.narrow(ctx.dim, ctx.sp.rank * grad.shape[ctx.dim], grad.shape[ctx.dim]).copy_(grad)
        return out, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
        ctx.dim, ctx.sp = dim, sp
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


class _GatherHeads(torch.autograd.Function):
    """All-gather along dim 1 with the standard backward (sum over the group, keep the local slice).

    The sum is an all-reduce, which every backend has (gloo has no reduce-scatter); the tensors are the text
    heads only, so the extra traffic against a reduce-scatter is small."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        sp = ctx.sp
        grad = grad.contiguous()
        dist.all_reduce(grad, group=sp.group)
        return grad.chunk(sp.size, dim=1)[sp.rank].contiguous(), None


# ---------------------------------------------------------------------------------------------------------------
# building blocks of the families' wiring (each adapter's ``sequence_parallel_hooks`` registers them on its modules)


def check_heads(transformer: torch.nn.Module, sp: SequenceParallel, family: str) -> int:
    """The attention head count of the diffusers ``transformer``, checked to be divisible by the group size."""
    config = getattr(transformer, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise TypeError(f"sequence parallelism for {family!r} needs the diffusers transformer, got {type(transformer).__name__}")
    if heads % sp.size:
        raise ValueError(f"the model's {heads} attention heads are not divisible by parallel.sequence_parallel_size={sp.size}")
    return heads


def shard_video(sp: SequenceParallel, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N_video, C] -> this rank's [B, N_video/P, C] (ValueError when N_video is not divisible by P)."""
    if hidden.shape[1] % sp.size:
        sp.check_divisible(hidden.shape[1], heads)
    return sp.shard(hidden, 1)


def rope_hook(sp: SequenceParallel, dim: int) -> Any:
    """Forward hook sharding rotary tables (a tensor or a tuple of them) along their token ``dim``."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        return tuple(sp.shard(t, dim) for t in output) if isinstance(output, tuple) else sp.shard(output, dim)

    return hook


def gather_hook(sp: SequenceParallel) -> Any:
    """Forward hook all-gathering the token shards of a module's output ``[B, N/P, C]`` (the output projection)."""

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return sp.gather(output, 1)

    return hook
