"""``attention.type: svg2``: Sparse VideoGen2's semantic-aware routing, one state per layer.

Steps. A repeated call of the same layer inside one router step is gradient checkpointing recomputing the block
(during backward, *after* that forward but *before* the next ``begin_step``): SVG2 then replays the routing
(clusters, selection) of the first call instead of clustering again, so the recomputed activations are those the
first forward produced. This holds as long as every forward is followed by its backward before the next forward
(the usual loop, gradient accumulation included). Across steps each layer warm-starts k-means from its last
centroids; those travel with the checkpoint (:meth:`SVG2Attention.state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from train.attention.methods.base import AttentionCall, AttentionMethod, KeyName
from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["SVG2Attention"]


@dataclass
class _LayerSVG2:
    """SVG2 bookkeeping of one layer: warm start across steps, routing replay within a step."""

    warm: Any = None  # state returned by the last first-call of this layer (centroids to start from)
    warm_key: Optional[tuple] = None  # shapes the warm state belongs to
    step: int = -1  # step of ``current``
    current: Any = None  # state of this step's first call (its routing is replayed by recomputations)
    start: Any = None  # state the first call of this step started from
    calls: int = 0


class SVG2Attention(AttentionMethod):
    """k-means clusters of q and k per layer and head, top-p selection of key clusters per query cluster."""

    def __init__(self, cfg: AttentionConfig, *, radial_rule: str) -> None:
        super().__init__(cfg, radial_rule=radial_rule)
        self._layers: dict[int, _LayerSVG2] = {}

    @classmethod
    def check_config(cls, cfg: AttentionConfig, key: KeyName) -> None:
        for name in ("num_q_clusters", "num_k_clusters"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key(name)}: expected a positive integer, got {value!r}")
        if not (_is_number(cfg.top_p) and 0.0 < cfg.top_p <= 1.0):
            raise ValueError(f"{key('top_p')}: expected a value in (0, 1], got {cfg.top_p!r}")
        if not (_is_number(cfg.min_kc_ratio) and 0.0 <= cfg.min_kc_ratio <= 1.0):
            raise ValueError(f"{key('min_kc_ratio')}: expected a value in [0, 1], got {cfg.min_kc_ratio!r}")
        iters = cfg.kmeans_iters  # sparse_attn.svg2_attention runs at least one Lloyd iteration
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
            raise ValueError(f"{key('kmeans_iters')}: expected null or an integer >= 1, got {iters!r}")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Optional[float]]:
        from sparse_attn import svg2_attention

        c = self.cfg
        kwargs: dict[str, Any] = dict(
            num_q_clusters=c.num_q_clusters,
            num_k_clusters=c.num_k_clusters,
            top_p=c.top_p,
            min_kc_ratio=c.min_kc_ratio,
            kmeans_iters=c.kmeans_iters,
            text_tokens=call.text_tokens,
            key_padding_mask=call.key_padding_mask,
            backend=c.backend,
        )
        layer = self._layers.setdefault(call.layer_idx, _LayerSVG2())
        shape_key = (tuple(q.shape), q.device.type)
        if layer.step != call.step:  # first call of this layer in this step: route afresh (warm-started)
            start = layer.warm if layer.warm_key == shape_key else None
            out, state = svg2_attention(q, k, v, state=start, **kwargs)
            layer.step, layer.current, layer.start, layer.calls = call.step, state, start, 1
            layer.warm, layer.warm_key = state, shape_key
            return out, _state_density(state)
        # A repeated call within the step: gradient checkpointing recomputing the block. Start from the same state
        # as the first call: with identical q/k (checkpointing restores the RNG) the deterministic k-means gives the
        # same routing.
        layer.calls += 1
        out, _ = svg2_attention(q, k, v, state=layer.start, **kwargs)
        return out, None

    def geometry_changed(self, geometry: VideoGeometry) -> None:
        """Centroids of another token layout are no warm start: every layer clusters afresh."""
        self._layers.clear()

    def state(self, layer_idx: int) -> Any:
        """The SVG2 state of ``layer_idx``'s first call in the current step (None before any call)."""
        layer = self._layers.get(layer_idx)
        return None if layer is None else layer.current

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Warm-start centroids per layer (tensors and plain values only), so that a resumed run routes exactly as
        an uninterrupted one."""
        layers = {}
        for idx, layer in self._layers.items():
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
        return layers

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from sparse_attn import SVG2State

        self._layers.clear()
        for idx, saved in state.items():
            device = torch.device(saved["device_type"])
            warm = SVG2State(
                q_centroids=saved["q_centroids"].to(device),
                k_centroids=saved["k_centroids"].to(device),
                calls=int(saved["calls"]),
            )
            self._layers[int(idx)] = _LayerSVG2(warm=warm, warm_key=(tuple(saved["shape"]), saved["device_type"]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _state_density(state: Any) -> float:
    """Block/pair density an SVG2 state reports (attribute or mapping), 1.0 when it reports none."""
    from torch import Tensor

    for name in ("density", "last_density"):
        value = state.get(name) if isinstance(state, dict) else getattr(state, name, None)
        if value is not None:
            value = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            if isinstance(value, Tensor):
                value = value.float().mean().item()
            return float(value)
    return 1.0
