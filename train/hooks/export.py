"""``export.at_end``: the final weights exported (train/exporting.py) into ``<run>/export`` on the main process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.hooks.base import Hook

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run, TrainResult


class ExportAtEnd(Hook):
    def __init__(self, lora_formats: list[str]) -> None:
        self.lora_formats = lora_formats

    def on_train_end(self, run: "Run", result: "TrainResult") -> None:
        if not run.is_main:
            return
        from train.exporting import export_checkpoint

        out = run.run_dir / "export"
        export_checkpoint(result.final_dir, out, lora_formats=self.lora_formats, force=True)
        result.exported_to = out
