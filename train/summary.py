"""The summary a run prints at the end: where everything went, the loss trend, skipped steps and data."""

from __future__ import annotations

from typing import Any

from train.run import Run, TrainResult


def summary(run: Run, result: TrainResult) -> str:
    run_dir = run.run_dir
    lines = [
        "done.",
        f"  run folder:      {run_dir}",
        f"  resolved config: {run_dir / 'config.yaml'}",
        f"  final weights:   {result.final_dir / 'weights'}",
        f"  checkpoints:     {run_dir / 'checkpoints'}",
    ]
    if result.losses:
        k = max(1, min(5, len(result.losses) // 2))
        first, last = result.losses[:k], result.losses[-k:]
        lines.append(f"  loss:            {sum(first) / k:.4f} (mean of the first {k} steps) -> {sum(last) / k:.4f} (last {k})")
    if result.bad_steps:
        lines.append(f"  skipped steps:   {result.bad_steps} (non-finite loss)")
    lines.extend(_data_summary(run.data_report))
    if run.cfg.tracking.report_to == "wandb":
        lines.append(f"  wandb:           {run_dir / 'wandb'}  (offline runs: `wandb sync <that folder>/offline-run-*`)")
    if result.exported_to is not None:
        lines.append(f"  export:          {result.exported_to}")
    return "\n".join(lines)


def _data_summary(report: Any) -> list[str]:
    """The data lines of the final summary: what was used and what was skipped (and why)."""
    if report is None:
        return []
    skipped = {r: n for r, n in report.skipped.items() if n}
    why = f" ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else ""
    lines = [f"  data:            {report.videos} videos, {report.kept} used ({report.clips} clips), "
             f"{report.total_skipped} skipped{why}"]
    if report.decode_failures:
        lines.append(f"  decode failures: {report.decode_failures} during training ({len(report.failed_videos)} videos; "
                     "each replaced by another clip)")
    return lines
