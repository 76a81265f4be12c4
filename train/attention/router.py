"""The one place where a recipe's ``attention:`` section meets ``sparse_attn``: dispatch, sequence parallelism, steps.

Every family's attention processor hands its (already projected, normalised, rotated) q, k, v to an
:class:`AttentionRouter`. The router decides whether the call runs dense (``attention.type: dense``, the first
``dense_layers`` blocks, the sampler's dense steps through :meth:`~AttentionRouter.dense_override`, a per-call
``dense=True``) or goes to the configured method (``train/attention/methods/``, one module per
``attention.type``), wraps it in Ulysses sequence parallelism when set, checks the shapes against the clip
geometry and counts each step's calls and densities.

Steps. ``begin_step()`` marks the start of one transformer forward (the adapters call it from a forward
pre-hook on the transformer, so trainers and pipelines need not; calling it again is harmless). Gradient
checkpointing re-runs a block's forward during backward, i.e. *after* that forward but *before* the next
``begin_step``: a method sees the router's step with every call and can tell such a recomputation (SVG2 replays
its routing then).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from train.attention.check import check_attention_config
from train.attention.methods import get_method
from train.attention.methods.base import AttentionCall, AttentionMethod
from train.attention.methods.dense import sdpa
from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

__all__ = ["AttentionRouter"]

#: Key of the method's state in :meth:`AttentionRouter.state_dict`. It keeps the name of the first method with
#: state, so that checkpoints written before the methods were split out resume unchanged.
_METHOD_STATE_KEY = "svg2"


@dataclass
class _StepStats:
    densities: list[float] = field(default_factory=list)
    dense_calls: int = 0
    sparse_calls: int = 0


class AttentionRouter:
    """Routes one model's self-attention calls to dense SDPA or the configured attention method.

    ``radial_rule`` is the family's rule name of ``sparse_attn.radial_block_mask`` (its mask layout). ``geometry``
    is the token layout of the clips being processed; :meth:`set_geometry` changes it (buckets, validation at
    another size). ``method`` is the :class:`~train.attention.methods.base.AttentionMethod` of ``cfg.type``.
    """

    def __init__(self, cfg: AttentionConfig, geometry: VideoGeometry, *, radial_rule: str) -> None:
        check_attention_config(cfg)
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        self.cfg = cfg
        self.radial_rule = radial_rule
        self.geometry = geometry
        self.method: AttentionMethod = get_method(cfg.type)(cfg, radial_rule=radial_rule)
        #: Forces dense attention in every layer while True (the sampler's first denoising steps).
        self.force_dense = False
        #: Set by the trainer for Ulysses sequence parallelism (train/sequence_parallel.py): q, k, v arrive
        #: holding 1/P of the tokens and all heads, and are exchanged to 1/P of the heads and all tokens.
        self.sequence_parallel: Any = None
        self._step = 0
        self._current = _StepStats()
        self._last = _StepStats()

    # -- steps and modes -------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a new transformer forward: a new step for the method (SVG2 routes afresh), fresh density statistics."""
        if self._current.dense_calls or self._current.sparse_calls:
            self._last = self._current
            self._current = _StepStats()
        self._step += 1

    @property
    def step(self) -> int:
        """Number of ``begin_step`` calls so far."""
        return self._step

    @contextlib.contextmanager
    def dense_override(self, enabled: bool = True) -> Iterator["AttentionRouter"]:
        """``with router.dense_override(): ...`` runs every layer dense (e.g. the first denoising steps)."""
        previous, self.force_dense = self.force_dense, bool(enabled)
        try:
            yield self
        finally:
            self.force_dense = previous

    def set_geometry(self, geometry: VideoGeometry) -> None:
        """Switch to another token layout; the method drops what belongs to the old one (SVG2 warm starts)."""
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        if geometry != self.geometry:
            self.geometry = geometry
            self.method.geometry_changed(geometry)

    def density(self) -> float:
        """Mean block density of the sparse calls of the last step with attention calls (1.0 if none)."""
        stats = self._current if (self._current.dense_calls or self._current.sparse_calls) else self._last
        if not stats.densities:
            return 1.0
        return float(sum(stats.densities) / len(stats.densities))

    def is_dense(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` runs dense at the moment (a dense method, one of the first dense_layers, override)."""
        return not self.method.sparse or layer_idx < self.cfg.dense_layers or self.force_dense

    # -- the call ---------------------------------------------------------------------------------------
    def __call__(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        text_tokens: int = 0,
        key_padding_mask: Optional[Tensor] = None,
        dense: bool = False,
        layout: str = "bhnd",
    ) -> Tensor:
        """Attention of ``q, k, v`` ``[B, H, N, D]`` (video tokens first, then ``text_tokens`` text tokens).

        ``key_padding_mask``: bool ``[B, N]``, True = valid key (padded text tokens are False).
        Returns ``[B, H, N, D]`` in q's dtype. ``layout="bnhd"``: q, k, v and the result are ``[B, N, H, D]``, as the
        processors hold them before their transpose; a method with ``writes_bnhd`` (radial) then reads and writes that
        layout directly (no transpose copy of the output), the other paths work on transposed views.
        """
        if layout not in ("bhnd", "bnhd"):
            raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
        sp = self.sequence_parallel
        if layout == "bnhd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if sp is None:
                return self._attend(layer_idx, q, k, v, text_tokens, key_padding_mask, dense, bnhd=True)
            return self._sequence_parallel(sp, layer_idx, q, k, v, text_tokens, key_padding_mask, dense).transpose(1, 2)
        if sp is not None:
            return self._sequence_parallel(sp, layer_idx, q, k, v, text_tokens, key_padding_mask, dense)
        return self._attend(layer_idx, q, k, v, text_tokens, key_padding_mask, dense)

    def _sequence_parallel(
        self,
        sp: Any,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        text_tokens: int,
        key_padding_mask: Optional[Tensor],
        dense: bool,
    ) -> Tensor:
        """Ulysses around the attention: q, k, v hold this rank's video shard then all ``text_tokens`` text tokens
        (replicated), all heads. The video part goes through the all-to-all (all video tokens, 1/P of the
        heads), the text part is sliced to the same heads; the output's text heads are all-gathered back."""
        if not text_tokens:
            q, k, v = sp.seq_to_heads(q), sp.seq_to_heads(k), sp.seq_to_heads(v)
            out = self._attend(layer_idx, q, k, v, 0, key_padding_mask, dense)
            return sp.heads_to_seq(out)
        if q.dim() != 4 or q.shape[2] < text_tokens:
            raise ValueError(
                f"sequence parallel attention: q must be [B, H, N_video/P + text_tokens, D] with text_tokens={text_tokens}, "
                f"got {tuple(q.shape)}"
            )
        local_video = q.shape[2] - text_tokens
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"key_padding_mask must be bool [B, N] = [{q.shape[0]}, {q.shape[2]}] (this rank's video shard + "
                f"text), got {tuple(key_padding_mask.shape)}"
            )

        def to_heads(x: Tensor) -> Tensor:  # [video all tokens; text] for this rank's heads
            return torch.cat([sp.seq_to_heads(x[:, :, :local_video]), sp.local_heads(x[:, :, local_video:])], dim=2)

        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        n_video = q.shape[2] - text_tokens
        if key_padding_mask is not None:  # video keys are always valid; the text part is replicated
            text_valid = key_padding_mask[:, local_video:]
            key_padding_mask = torch.cat([text_valid.new_ones(text_valid.shape[0], n_video), text_valid], dim=1)
        out = self._attend(layer_idx, q, k, v, text_tokens, key_padding_mask, dense)
        video, text = out[:, :, :n_video], out[:, :, n_video:]
        return torch.cat([sp.heads_to_seq(video), sp.gather_heads(text)], dim=2)

    def _attend(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        text_tokens: int,
        key_padding_mask: Optional[Tensor],
        dense: bool,
        bnhd: bool = False,
    ) -> Tensor:
        """``[B, H, N, D]`` views in, ``[B, H, N, D]`` out; with ``bnhd`` the result is ``[B, N, H, D]`` instead
        (a method with ``writes_bnhd`` writes it so, the other results are transposed back as views)."""
        self._check(layer_idx, q, k, v, text_tokens, key_padding_mask)
        if dense or self.is_dense(layer_idx):
            out = sdpa(q, k, v, key_padding_mask)
            self._current.dense_calls += 1
        else:
            native = bnhd and self.method.writes_bnhd
            call = AttentionCall(layer_idx, self._step, self.geometry, text_tokens, key_padding_mask, bnhd=native)
            out, density = self.method.attend(q, k, v, call)
            if density is not None:  # None: a recomputation replaying this step's call, not a new one
                self._current.sparse_calls += 1
                self._current.densities.append(density)
            if native:
                return out.to(q.dtype)
        out = out.to(q.dtype)
        return out.transpose(1, 2) if bnhd else out

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The step count and the method's state (SVG2: warm-start centroids per layer; tensors and plain values
        only), so that a resumed run routes exactly as an uninterrupted one; accelerate saves it with the
        checkpoint (register_for_checkpointing)."""
        return {"step": self._step, _METHOD_STATE_KEY: self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state.get("step", 0))
        self.method.load_state_dict(state.get(_METHOD_STATE_KEY, {}))

    # -- checks -----------------------------------------------------------------------------------------
    def _check(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, text_tokens: int, key_padding_mask: Optional[Tensor]
    ) -> None:
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
        if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"q, k, v must share [B, H, N] (and q, k D): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if not isinstance(text_tokens, int) or text_tokens < 0:
            raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
        n = q.shape[2]
        expected = self.geometry.video_tokens + text_tokens
        if n != expected:
            g = self.geometry
            raise ValueError(
                f"the attention mask does not match the token count: q/k/v have N={n} tokens but the geometry "
                f"gives {expected} ({g.latent_frames} latent frames x {g.tokens_per_frame} tokens per frame"
                f" + {text_tokens} text tokens)"
            )
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (q.shape[0], n):
                raise ValueError(
                    f"key_padding_mask must be bool [B, N] = [{q.shape[0]}, {n}], got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )


