"""What an attention method is to the router: the interface every ``train/attention/methods/<name>.py`` implements.

The router (``train/attention/router.py``) decides *whether* a call is sparse (dense layers, the sampler's dense
steps, a per-call ``dense=True``), wraps it in sequence parallelism and counts the step's calls; the method only
computes the attention of a sparse call and says which block density it used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

if TYPE_CHECKING:  # pragma: no cover - torch is imported by the calls, not by a config check
    from torch import Tensor

__all__ = ["AttentionCall", "AttentionMethod", "KeyName"]

#: Turns an ``AttentionConfig`` field name into the name the user wrote (``attention.top_p``, ``--top-p``).
KeyName = Callable[[str], str]


@dataclass(frozen=True)
class AttentionCall:
    """Everything about one routed call besides q, k, v."""

    layer_idx: int
    step: int  # the router's step (number of ``begin_step`` calls): a repeated layer within it is a recomputation
    geometry: VideoGeometry  # token layout of the clip: video tokens first, then ``text_tokens`` text tokens
    text_tokens: int
    key_padding_mask: Optional[Tensor]  # bool [B, N], True = valid key
    bnhd: bool = False  # only for methods with ``writes_bnhd``: return [B, N, H, D] instead of [B, H, N, D]


class AttentionMethod(ABC):
    """One value of ``attention.type``. Subclasses live one per module and are listed in ``METHODS``."""

    #: False for a method that is dense everywhere: the router then runs every layer through dense SDPA itself.
    sparse: ClassVar[bool] = True
    #: True when ``attend`` honours ``call.bnhd`` (q, k, v are then transposed views of [B, N, H, D] tensors and the
    #: result is written in that layout); otherwise the router transposes the [B, H, N, D] result back as a view.
    writes_bnhd: ClassVar[bool] = False

    def __init__(self, cfg: AttentionConfig, *, radial_rule: str) -> None:
        """``radial_rule``: the family's rule name of ``sparse_attn.radial_block_mask`` (``model=``)."""
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: AttentionConfig, key: KeyName) -> None:
        """Raise ValueError ``"<key(field)>: expected ..., got ..."`` for a bad value of this method's own keys.

        Called for every registered method whatever ``attention.type`` is (a bad value is a mistake either way),
        from the one validation in ``train.attention.check``."""

    @abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Optional[float]]:
        """The attention of ``[B, H, N, D]`` q, k, v and the block density this call used.

        A density of None means "not a new call" (a recomputation replaying an earlier one) and is not counted."""

    def geometry_changed(self, geometry: VideoGeometry) -> None:
        """The clips changed shape (buckets, validation at another size): drop per-shape state that cannot carry over."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to attend exactly as an uninterrupted one (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; a method without state ignores what it is given."""
