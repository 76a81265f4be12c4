"""Helpers shared by the data tests: tiny videos whose frames encode their own index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Frame k of an "index" video is flat gray 8 + 6k: decoding recovers k from the mean brightness
# (within +-1 after H.264), an end-to-end check of which source frame was picked.
LEVEL0, LEVEL_STEP = 8, 6


def index_frames(frames: int, height: int, width: int) -> np.ndarray:
    if LEVEL0 + LEVEL_STEP * (frames - 1) > 250:
        raise ValueError("too many frames for the brightness code")
    levels = LEVEL0 + LEVEL_STEP * np.arange(frames)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).astype(np.uint8).copy()


def frame_index_of(frames: np.ndarray) -> list[int]:
    """Recover the source index of each decoded 'index' frame ([N, H, W, 3] or [3, N, H, W] in [-1, 1])."""
    if frames.dtype != np.uint8:  # model range [-1, 1], channels first
        frames = ((np.asarray(frames) + 1.0) * 127.5).transpose(1, 2, 3, 0)
    means = frames.reshape(frames.shape[0], -1).mean(axis=1)
    return [int(round((m - LEVEL0) / LEVEL_STEP)) for m in means]


def noise_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, height, width, 3))
    shift = (np.arange(frames) * 7)[:, None, None, None]
    return ((base + shift) % 256).astype(np.uint8)



def write_metadata(folder: Path, rows: list[dict]) -> Path:
    path = folder / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Stand-ins for a VAE and a text encoder: deterministic, shape-changing, cheap. The cache module is
# generic over these callables; the real adapters are exercised in tests/train.
def fake_encode_videos(pixels):
    """[B, 3, F, H, W] -> [B, 4, (F-1)/4+1, H/8, W/8] (a 4x temporal, 8x spatial average pool)."""
    import torch

    b, c, f, h, w = pixels.shape
    first = pixels[:, :, :1]
    rest = pixels[:, :, 1:].reshape(b, c, (f - 1) // 4, 4, h, w).mean(3) if f > 1 else pixels[:, :, :0]
    x = torch.cat([first, rest], 2)
    x = torch.nn.functional.avg_pool3d(x, (1, 8, 8))
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


def fake_encode_prompts(captions):
    import torch

    codes = torch.zeros(len(captions), 6, 3)
    mask = torch.zeros(len(captions), 6, dtype=torch.bool)
    for i, text in enumerate(captions):
        for j, ch in enumerate(text[:6]):
            codes[i, j] = torch.tensor([ord(ch), len(text), 1.5])
            mask[i, j] = True
    return {"prompt_embeds": codes, "attention_mask": mask}
