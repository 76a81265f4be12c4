"""Validation videos during training: the family's pipeline, the live weights, the same sparse attention.

Runs on every rank (under ZeRO-3 a forward is collective); only the main process writes the mp4 files.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from train.config_schema import RecipeConfig


class Validator:
    def __init__(
        self, accelerator: Any, adapter: Any, cfg: RecipeConfig, transformer: torch.nn.Module, encoders: Any, run_dir: Path
    ) -> None:
        from train.sampling import text_length_for

        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, run_dir
        self.transformer = accelerator.unwrap_model(transformer)
        # The pipeline reuses the training transformer (and the encoders, when they are loaded already).
        self.pipeline = adapter.load_pipeline(transformer=self.transformer, encoders=encoders)
        self.pipeline.to(accelerator.device)
        self.pipeline.set_progress_bar_config(disable=True)
        v, d = cfg.validation, cfg.data
        self.shape = (v.frames or d.frames, v.height or d.height, v.width or d.width)
        length = text_length_for(adapter, self.pipeline)  # the text length training used, not the pipeline default
        self.extra = {} if length is None else {"max_sequence_length": length}

    @torch.no_grad()
    def render(self, step: int) -> dict[str, Path]:
        """One video per prompt with fixed seeds; returns {name: mp4 path} on the main process ({} elsewhere)."""
        from train.sampling import write_video

        v = self.cfg.validation
        frames, height, width = self.shape
        was_training = self.transformer.training
        self.transformer.eval()
        out_dir = self.run_dir / "validation" / f"step-{step:06d}"
        autocast = self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()
        videos: dict[str, Path] = {}
        try:
            for i, prompt in enumerate(v.prompts):
                gen = torch.Generator(device="cpu").manual_seed(v.seed + i)
                with autocast:
                    result = self.pipeline(
                        prompt=prompt,
                        num_frames=frames,
                        height=height,
                        width=width,
                        num_inference_steps=v.num_inference_steps,
                        guidance_scale=v.guidance_scale,
                        generator=gen,
                        output_type="np",
                        **self.extra,
                    )
                if self.accelerator.is_main_process:
                    videos[f"prompt-{i}"] = write_video(result.frames[0], out_dir / f"prompt-{i}.mp4", fps=self.cfg.data.fps)
        finally:
            if was_training:
                self.transformer.train()
        return videos
