"""The one place where a recipe's ``attention:`` section meets ``sparse_attn``.

Every family's attention processor hands its (already projected, normalised, rotated) q, k, v to an
:class:`AttentionRouter`, which picks dense SDPA, the radial block mask or SVG2 for that layer and call.
The router owns the per-run state: the radial masks (cached by geometry) and one SVG2 state per layer.

Steps. ``begin_step()`` marks the start of one transformer forward (the adapters call it from a forward
pre-hook on the transformer, so trainers and pipelines need not; calling it again is harmless). Gradient
checkpointing re-runs a block's forward during backward, i.e. *after* that forward but *before* the next
``begin_step``; a repeated call of the same layer inside one step is such a recomputation, and SVG2 then
replays the routing (clusters, selection) of the first call instead of clustering again, so the recomputed
activations are those the first forward produced. This holds as long as every forward is followed by its
backward before the next forward (the usual loop, gradient accumulation included).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

__all__ = ["AttentionRouter", "RADIAL_MODELS"]

#: Radial rule variants of sparse_attn.radial_block_mask (``model=``).
from sparse_attn.radial import MODELS as RADIAL_MODELS  # noqa: E402  (the rule names radial_block_mask knows)
_TYPES = ("dense", "radial", "svg2")
_BACKENDS = ("auto", "fa4", "triton", "torch")


@dataclass
class _LayerSVG2:
    """SVG2 bookkeeping of one layer: warm start across steps, routing replay within a step."""

    warm: Any = None  # state returned by the last first-call of this layer (centroids to start from)
    warm_key: Optional[tuple] = None  # shapes the warm state belongs to
    step: int = -1  # step of ``current``
    current: Any = None  # state of this step's first call (its routing is replayed by recomputations)
    start: Any = None  # state the first call of this step started from
    calls: int = 0


@dataclass
class _StepStats:
    densities: list[float] = field(default_factory=list)
    dense_calls: int = 0
    sparse_calls: int = 0


class AttentionRouter:
    """Routes one model's self-attention calls to dense SDPA, radial block-sparse or SVG2 attention.

    ``radial_rule`` selects the radial rule (a ``sparse_attn.radial.MODELS`` name). ``geometry`` is the token layout of
    the clips being processed; :meth:`set_geometry` changes it (buckets, validation at another size).
    """

    def __init__(self, cfg: AttentionConfig, geometry: VideoGeometry, *, radial_rule: str) -> None:
        _validate_config(cfg)
        if radial_rule not in RADIAL_MODELS:
            raise ValueError(f"radial_rule must be one of {list(RADIAL_MODELS)}, got {radial_rule!r}")
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        self.cfg = cfg
        self.radial_rule = radial_rule
        self.geometry = geometry
        #: Forces dense attention in every layer while True (the sampler's first denoising steps).
        self.force_dense = False
        #: Set by the trainer for Ulysses sequence parallelism (train/sequence_parallel.py): q, k, v arrive
        #: holding 1/P of the tokens and all heads, and are exchanged to 1/P of the heads and all tokens.
        self.sequence_parallel: Any = None
        self._step = 0
        self._masks: dict[tuple, tuple[Tensor, float]] = {}
        self._svg2: dict[int, _LayerSVG2] = {}
        self._svg2_replay_kw: Optional[str] = None  # keyword of svg2_attention that replays a routing
        self._current = _StepStats()
        self._last = _StepStats()

    # -- steps and modes -------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start a new transformer forward: new SVG2 routing, fresh density statistics."""
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
        """Switch to another token layout; masks of earlier layouts stay cached, SVG2 warm starts reset."""
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        if geometry != self.geometry:
            self.geometry = geometry
            self._svg2.clear()

    def density(self) -> float:
        """Mean block density of the sparse calls of the last step with attention calls (1.0 if none)."""
        stats = self._current if (self._current.dense_calls or self._current.sparse_calls) else self._last
        if not stats.densities:
            return 1.0
        return float(sum(stats.densities) / len(stats.densities))

    def is_dense(self, layer_idx: int) -> bool:
        """Whether ``layer_idx`` runs dense at the moment (type dense, one of the first dense_layers, override)."""
        return self.cfg.type == "dense" or layer_idx < self.cfg.dense_layers or self.force_dense

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
        processors hold them before their transpose; the radial kernels then read and write that layout directly
        (no transpose copy of the output), the other paths work on transposed views.
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
        (the radial path writes it so, the others are transposed back as views)."""
        self._check(layer_idx, q, k, v, text_tokens, key_padding_mask)
        if dense or self.is_dense(layer_idx):
            out = self._dense(q, k, v, key_padding_mask)
            self._current.dense_calls += 1
        elif self.cfg.type == "radial":
            if bnhd:
                return self._radial(q, k, v, text_tokens, key_padding_mask, bnhd=True).to(q.dtype)
            out = self._radial(q, k, v, text_tokens, key_padding_mask)
        else:
            out = self._svg2_call(layer_idx, q, k, v, text_tokens, key_padding_mask)
        out = out.to(q.dtype)
        return out.transpose(1, 2) if bnhd else out

    # -- paths ------------------------------------------------------------------------------------------
    @staticmethod
    def _dense(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

    def radial_mask(self, text_tokens: int = 0, device: Optional[torch.device] = None) -> Tensor:
        """The cached radial block mask of the current geometry (``bool [Nb, Nb]``)."""
        return self._mask_and_density(text_tokens, torch.device(device or "cpu"))[0]

    def _mask_and_density(self, text_tokens: int, device: torch.device) -> tuple[Tensor, float]:
        g, c = self.geometry, self.cfg
        key = (g.latent_frames, g.tokens_per_frame, text_tokens, str(device))
        hit = self._masks.get(key)
        if hit is None:
            from sparse_attn import mask_density, radial_block_mask

            mask = radial_block_mask(
                g.latent_frames,
                g.tokens_per_frame,
                block_size=c.block_size,
                decay_factor=c.decay_factor,
                model=self.radial_rule,
                text_tokens=text_tokens,
                attention_sink=c.attention_sink,
                device=device,
            )
            hit = (mask, mask_density(mask, block_size=c.block_size))
            if len(self._masks) >= 16:  # a few buckets at most; drop the oldest layout
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = hit
        return hit

    def _radial(
        self, q: Tensor, k: Tensor, v: Tensor, text_tokens: int, key_padding_mask: Optional[Tensor], bnhd: bool = False
    ) -> Tensor:
        """``[B, H, N, D]`` q, k, v (views); the result ``[B, N, H, D]`` when ``bnhd`` (the kernels read the
        transposed views as the [B, N, H, D] tensors they are and write that layout)."""
        from sparse_attn import block_sparse_attention

        mask, dens = self._mask_and_density(text_tokens, q.device)
        if bnhd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = block_sparse_attention(
            q, k, v, mask, block_size=self.cfg.block_size, backend=self.cfg.backend, key_padding_mask=key_padding_mask,
            **({"layout": "bnhd"} if bnhd else {}),
        )
        self._current.sparse_calls += 1
        self._current.densities.append(dens)
        return out

    def _svg2_call(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, text_tokens: int, key_padding_mask: Optional[Tensor]
    ) -> Tensor:
        from sparse_attn import svg2_attention

        c = self.cfg
        kwargs: dict[str, Any] = dict(
            num_q_clusters=c.num_q_clusters,
            num_k_clusters=c.num_k_clusters,
            top_p=c.top_p,
            min_kc_ratio=c.min_kc_ratio,
            kmeans_iters=c.kmeans_iters,
            text_tokens=text_tokens,
            key_padding_mask=key_padding_mask,
            backend=c.backend,
        )
        layer = self._svg2.setdefault(layer_idx, _LayerSVG2())
        shape_key = (tuple(q.shape), q.device.type)
        if layer.step != self._step:  # first call of this layer in this step: route afresh (warm-started)
            start = layer.warm if layer.warm_key == shape_key else None
            out, state = svg2_attention(q, k, v, state=start, **kwargs)
            layer.step, layer.current, layer.start, layer.calls = self._step, state, start, 1
            layer.warm, layer.warm_key = state, shape_key
            self._current.sparse_calls += 1
            self._current.densities.append(_state_density(state))
            return out
        # A repeated call within the step: gradient checkpointing recomputing the block. Replay the routing.
        layer.calls += 1
        replay = self._replay_keyword(svg2_attention)
        if replay is not None:
            out, _ = svg2_attention(q, k, v, state=layer.current, **{replay: True}, **kwargs)
        else:
            # No replay switch in this sparse_attn version: start from the same state as the first call;
            # with identical q/k (checkpointing restores the RNG) the deterministic k-means gives the same routing.
            out, _ = svg2_attention(q, k, v, state=layer.start, **kwargs)
        return out

    def _replay_keyword(self, fn: Any) -> Optional[str]:
        if self._svg2_replay_kw is None:
            params = inspect.signature(fn).parameters
            found = next((n for n in ("reuse_routing", "replay", "frozen_routing") if n in params), "")
            self._svg2_replay_kw = found
        return self._svg2_replay_kw or None

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SVG2 warm-start centroids per layer (tensors and plain values only), so that a resumed run routes
        exactly as an uninterrupted one; accelerate saves it with the checkpoint (register_for_checkpointing)."""
        layers = {}
        for idx, layer in self._svg2.items():
            st = layer.warm
            if st is None or layer.warm_key is None:
                continue
            shape, device_type = layer.warm_key
            layers[str(idx)] = {
                "q_centroids": st.q_centroids.detach().cpu(),
                "k_centroids": st.k_centroids.detach().cpu(),
                "calls": int(st.calls),
                "shape": list(shape),
                "device_type": device_type,
            }
        return {"step": self._step, "svg2": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from sparse_attn import SVG2State

        self._step = int(state.get("step", 0))
        self._svg2.clear()
        for idx, saved in state.get("svg2", {}).items():
            device = torch.device(saved["device_type"])
            warm = SVG2State(
                q_centroids=saved["q_centroids"].to(device),
                k_centroids=saved["k_centroids"].to(device),
                calls=int(saved["calls"]),
            )
            self._svg2[int(idx)] = _LayerSVG2(warm=warm, warm_key=(tuple(saved["shape"]), saved["device_type"]))

    def svg2_state(self, layer_idx: int) -> Any:
        """The SVG2 state of ``layer_idx``'s first call in the current step (None before any call)."""
        layer = self._svg2.get(layer_idx)
        return None if layer is None else layer.current

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


def _state_density(state: Any) -> float:
    """Block/pair density an SVG2 state reports (attribute or mapping), 1.0 when it reports none."""
    for name in ("density", "last_density"):
        value = state.get(name) if isinstance(state, dict) else getattr(state, name, None)
        if value is not None:
            value = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            if isinstance(value, Tensor):
                value = value.float().mean().item()
            return float(value)
    return 1.0


def _validate_config(cfg: AttentionConfig) -> None:
    if not isinstance(cfg, AttentionConfig):
        raise TypeError(f"attention config must be an AttentionConfig, got {type(cfg).__name__}")
    if cfg.type not in _TYPES:
        raise ValueError(f"attention.type must be one of {list(_TYPES)}, got {cfg.type!r}")
    if cfg.backend not in _BACKENDS:
        raise ValueError(f"attention.backend must be one of {list(_BACKENDS)}, got {cfg.backend!r}")
    if not isinstance(cfg.block_size, int) or cfg.block_size < 16:
        raise ValueError(f"attention.block_size must be an int >= 16, got {cfg.block_size!r}")
    if not isinstance(cfg.dense_layers, int) or cfg.dense_layers < 0:
        raise ValueError(f"attention.dense_layers must be an int >= 0, got {cfg.dense_layers!r}")
    if not (isinstance(cfg.decay_factor, (int, float)) and math.isfinite(cfg.decay_factor) and cfg.decay_factor > 0):
        raise ValueError(f"attention.decay_factor must be a finite number > 0, got {cfg.decay_factor!r}")
    if cfg.attention_sink not in (None, True, False):
        raise ValueError(f"attention.attention_sink must be true, false or null, got {cfg.attention_sink!r}")
    for name in ("num_q_clusters", "num_k_clusters"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"attention.{name} must be an int >= 1, got {value!r}")
    if not (0.0 < cfg.top_p <= 1.0):
        raise ValueError(f"attention.top_p must be in (0, 1], got {cfg.top_p!r}")
    if not (0.0 <= cfg.min_kc_ratio <= 1.0):
        raise ValueError(f"attention.min_kc_ratio must be in [0, 1], got {cfg.min_kc_ratio!r}")
    if cfg.kmeans_iters is not None and (not isinstance(cfg.kmeans_iters, int) or cfg.kmeans_iters < 0):
        raise ValueError(f"attention.kmeans_iters must be null or an int >= 0, got {cfg.kmeans_iters!r}")
