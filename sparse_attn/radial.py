"""Radial Attention block mask (Li et al., NeurIPS 2025), reproduced block for block.

The official code (``gen_log_mask_shrinked`` in mit-han-lab/radial-attention) builds the mask
with a Python double loop over frame pairs, pasting each pair's token-level mask onto a
block-aligned canvas and quantising it to blocks. That takes seconds at video lengths. Here the
same rule is evaluated analytically:

* every frame pair ``(i, j)`` is described by an integer band half-width ``W`` (or "dropped"),
  and by the offsets ``rr = i*tpf % bs`` / ``rc = j*tpf % bs`` at which its frames start inside
  a block. Only a few distinct ``(W, rr, rc)`` patterns exist (widths halve with
  ``bit_length(|i-j|)``, offsets repeat with period ``bs / gcd(tpf, bs)``);
* for one pattern, the number of True tokens in column ``c`` of a block row is the length of
  the intersection of two intervals, so the set of columns whose count exceeds a threshold is
  itself an interval. The official quantisation ("a block is kept iff more than 60 % of its
  non-empty columns are more than 1/3 full") then needs only interval lengths: O(K^2) integer
  work per pattern instead of O((K*bs)^2) tokens;
* the K x K pattern of every kept pair is scattered (OR) into the grid at its block offset.

Rule details reproduced (see shared/notes/radial_attention.md, "Fine points of the official
rule"):

* half-width: ``tpf`` for ``|i-j| <= 1``; otherwise
  ``max(2**bit_length(tpf) / 2**bit_length(d) * decay_factor, block_size)``, compared in float32
  (effective width ``floor(float32(w))``);
* frame-pair decimation with the threshold fixed at 128 tokens (independent of the block size and
  of ``decay_factor``), applied to every non-sink pair including ``d == 1``;
* ``shrinkMaskStrict``: integer forms ``3*count > bs`` and ``5*#dense > 3*#non-empty``, each
  pair's canvas cropped to ``K*bs`` rows and columns (``K = ceil(tpf/bs)``);
* optional attention sink: every query frame sees key frame 0 completely (overrides width and
  decimation);
* block rows/columns from ``floor(num_video_tokens / bs)`` on are dense: text tokens, and the
  partial block that holds the video tail / the video-text boundary.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

__all__ = ["radial_block_mask", "mask_density", "MODELS", "DECIMATION_THRESHOLD"]

#: Token threshold of the official frame-pair decimation (hard-coded to 128 upstream, even when
#: the block size is 64 - Wan2.2 - so it is kept fixed here too).
DECIMATION_THRESHOLD = 128

#: Model family -> default attention sink. Wan keeps the first-frame sink in the current
#: official code; HunyuanVideo dropped it (upstream commit of 2025-07-06). The official code has
#: no Mochi branch at all; Mochi is, like HunyuanVideo, a joint text+video MMDiT whose text comes
#: after the video tokens, so it follows the HunyuanVideo rule (no sink). For the width rule the
#: families are identical since the 2025-11-11 upstream change (|i-j| == 1 is a full frame for Wan
#: too), so ``model`` only selects the sink default. ``"hunyuan_video"`` is an alias of ``"hunyuan"``:
#: the spelling the training code uses for that family.
MODELS: dict[str, bool] = {"wan": True, "hunyuan": False, "hunyuan_video": False, "mochi": False}

_CACHE_SIZE = 32


# --------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------

def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _normalize_device(device: object) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must be None, a str or a torch.device, got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available")
        if dev.index is None:
            # "cuda" and "cuda:<current>" must hit the same cache entry.
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    text_tokens: int = 0,
    attention_sink: bool | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Block mask of the official Radial Attention rule, ``bool [Nb, Nb]``.

    ``Nb = ceil((num_frames * tokens_per_frame + text_tokens) / block_size)``; the sequence
    is the video tokens (frame-major) followed by ``text_tokens`` text tokens, which are dense
    in both directions. ``True`` = the (query block, key block) pair is computed.

    ``attention_sink=None`` takes the model's default (on for ``"wan"``, off for ``"hunyuan"``
    - alias ``"hunyuan_video"`` - and ``"mochi"``); the paper's HunyuanVideo sparsity figures were
    made with the sink on.

    The result is cached by its (normalised) arguments and the *same tensor object* is returned
    for repeated calls: the attention op caches its block index lists by tensor identity.
    Callers must therefore never modify the returned tensor in place - ``.clone()`` it first.
    """
    num_frames = _int_arg("num_frames", num_frames, 1)
    tokens_per_frame = _int_arg("tokens_per_frame", tokens_per_frame, 1)
    block_size = _int_arg("block_size", block_size, 16)
    text_tokens = _int_arg("text_tokens", text_tokens, 0)
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, numbers.Real):
        raise TypeError(f"decay_factor must be a positive real number, got {decay_factor!r}")
    decay = float(decay_factor)
    if not (math.isfinite(decay) and decay > 0.0):
        raise ValueError(f"decay_factor must be finite and > 0, got {decay_factor!r}")
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if attention_sink is None:
        sink = MODELS[model]
    elif isinstance(attention_sink, bool):
        sink = attention_sink
    else:
        raise TypeError(f"attention_sink must be None or a bool, got {attention_sink!r}")
    dev = _normalize_device(device)
    # ``model`` only selects the sink default (see MODELS), so it is not part of the key:
    # equal rules give the identical tensor.
    return _cached_mask(num_frames, tokens_per_frame, block_size, decay, sink, text_tokens, dev)


def mask_density(
    block_mask: torch.Tensor,
    *,
    num_video_tokens: int | None = None,
    block_size: int = 128,
) -> float:
    """Fraction of True blocks (sparsity = 1 - density).

    With ``num_video_tokens`` only the video x video part counts: the first
    ``floor(num_video_tokens / block_size)`` block rows and columns, i.e. the full video blocks
    (the official border; the block holding the video tail or the video-text boundary is dense
    by construction and excluded). Leading batch/head dimensions are averaged over.
    """
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    if block_mask.dim() < 2 or block_mask.shape[-1] != block_mask.shape[-2]:
        raise ValueError(f"block_mask must have shape [..., Nb, Nb], got {tuple(block_mask.shape)}")
    if block_mask.numel() == 0:
        raise ValueError(f"block_mask is empty, shape {tuple(block_mask.shape)}")
    block_size = _int_arg("block_size", block_size, 1)
    if num_video_tokens is not None:
        num_video_tokens = _int_arg("num_video_tokens", num_video_tokens, 1)
        nvb = num_video_tokens // block_size
        nb = block_mask.shape[-1]
        if nvb < 1:
            raise ValueError(
                f"num_video_tokens={num_video_tokens} holds no full block of "
                f"block_size={block_size}"
            )
        if nvb > nb:
            raise ValueError(
                f"num_video_tokens={num_video_tokens} needs {nvb} video blocks but block_mask has "
                f"only {nb} (block_size={block_size})"
            )
        block_mask = block_mask[..., :nvb, :nvb]
    return block_mask.sum().item() / block_mask.numel()


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------

def _distance_tables(
    num_frames: int, tpf: int, bs: int, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame distance ``d``: effective integer half-width and whether the pair is kept.

    O(num_frames) scalar work; everything per frame *pair* is vectorised.
    """
    bl_tpf = tpf.bit_length()
    d = torch.arange(num_frames, dtype=torch.int64)
    # bit_length(d) for d >= 0 (0 -> 0), exact for any int64 via the float64 frexp exponent.
    group = torch.frexp(d.to(torch.float64)).exponent.to(torch.int64)
    group = torch.where(d == 0, torch.zeros_like(group), group)
    # Decimation: L' = 2**bl(tpf) / 2**g; kept if L' >= 128, else iff d % int(128 / L') == 0,
    # with int(128 / L') = 2**(7 + g - bl(tpf)).
    exp = group + (DECIMATION_THRESHOLD.bit_length() - 1) - bl_tpf
    split = torch.pow(2, exp.clamp(min=0).clamp(max=62))
    keep = (exp <= 0) | (d % split == 0)
    # Band: w = max(2**bl(tpf) / 2**g * decay, bs) in float64, as Python computes it, then the
    # official int-vs-float comparison promotes to float32 -> effective width floor(float32(w)).
    w = float(2**bl_tpf) / torch.pow(2.0, group.to(torch.float64))  # exact powers of two
    w = torch.clamp(w * decay, min=float(bs))
    w = w.to(torch.float32).clamp(max=float(tpf)).floor().to(torch.int64)
    w = torch.where(d <= 1, torch.full_like(w, tpf), w)
    return w, keep


def _block_patterns(
    width: torch.Tensor, rr: torch.Tensor, rc: torch.Tensor, tpf: int, bs: int, k: int
) -> torch.Tensor:
    """``shrinkMaskStrict`` of a cropped, offset band canvas, for P patterns at once -> [P, K, K].

    Pattern p: local (within-frame) token (r, c) is True iff |c - r| <= width[p]; row r sits at
    canvas row rr[p] + r, column c at canvas column rc[p] + c; the canvas is cut to K*bs square.
    """
    dev = width.device
    blk = torch.arange(k, device=dev, dtype=torch.int64)
    w = width[:, None]

    def token_range(off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Local token range [lo, hi] that falls into each canvas block (empty if hi < lo). The
        # official crop to K*bs is implicit: only the first K blocks are evaluated.
        off = off[:, None]
        lo = torch.clamp(blk * bs - off, min=0)
        hi = torch.clamp((blk + 1) * bs - off, max=tpf) - 1
        return lo, hi

    a0, a1 = token_range(rr)  # rows of each row block        [P, K]
    c0, c1 = token_range(rc)  # columns of each column block  [P, K]

    def columns_above(t: int) -> torch.Tensor:
        # #columns of block (a, b) holding more than t True tokens. The count in column c is
        # |[a0, a1] & [c - w, c + w]|, and count > t  <=>  a1 - a0 >= t, 2w >= t and
        # a0 - w + t <= c <= a1 + w - t: an interval of columns.
        ok = (a1 - a0 >= t) & (2 * w >= t)
        lo = (a0 - w + t)[:, :, None]
        hi = (a1 + w - t)[:, :, None]
        n = torch.minimum(hi, c1[:, None, :]) - torch.maximum(lo, c0[:, None, :]) + 1
        return n.clamp(min=0) * ok[:, :, None]

    nonzero = columns_above(0)
    dense = columns_above(bs // 3)  # count / bs > 1/3  <=>  count > floor(bs / 3)
    return 5 * dense > 3 * nonzero  # fraction of dense non-empty columns > 0.6


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_mask(
    num_frames: int,
    tpf: int,
    bs: int,
    decay: float,
    sink: bool,
    text_tokens: int,
    device: torch.device,
) -> torch.Tensor:
    num_video = num_frames * tpf
    nb = -(-(num_video + text_tokens) // bs)
    border = num_video // bs
    k = -(-tpf // bs)

    w_d, keep_d = _distance_tables(num_frames, tpf, bs, decay)
    w_d, keep_d = w_d.to(device), keep_d.to(device)

    frames = torch.arange(num_frames, device=device, dtype=torch.int64)
    dist = (frames[:, None] - frames[None, :]).abs()
    width = w_d[dist]
    keep = keep_d[dist]
    if sink:
        width[:, 0] = tpf
        keep[:, 0] = True

    qi, kj = keep.nonzero(as_tuple=True)  # kept pairs only
    width = width[qi, kj]
    starts = frames * tpf
    rr, rc = starts[qi] % bs, starts[kj] % bs

    # Distinct (width, row offset, column offset) patterns.
    key = (width * bs + rr) * bs + rc
    uniq, inverse = torch.unique(key, return_inverse=True)
    u_rc = uniq % bs
    u_rr = (uniq // bs) % bs
    u_w = uniq // (bs * bs)
    patterns = _block_patterns(u_w, u_rr, u_rc, tpf, bs, k)  # [P, K, K]

    # Scatter (OR) every kept pair's pattern at its block offset; all written values are True,
    # so duplicate indices are harmless and the result is deterministic.
    pair, a, b = patterns[inverse].nonzero(as_tuple=True)
    base = (starts[qi] // bs) * nb + starts[kj] // bs  # flat index of the pair's first block
    mask = torch.zeros(nb * nb, dtype=torch.bool, device=device)
    mask[base[pair] + a * nb + b] = True
    mask = mask.view(nb, nb)
    mask[border:, :] = True
    mask[:, border:] = True
    return mask
