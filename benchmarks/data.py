#!/usr/bin/env python
"""Decode + preprocess throughput of the clip pipeline (clips/s), for docs/benchmarks.md.

Generates its own synthetic 480p H.264 videos (24 fps, textured background, long enough for 321
frames at 16 fps), then times the real path - PyAV decode with seeking, 24 -> 16 fps resampling,
resize + centre crop to 480x832, tensor conversion, DataLoader workers, same-bucket collate - for
each worker count and pixel dtype. Steady-state throughput excludes the first batch (worker start);
the time to the first batch is reported separately. Runs on CPU only (no GPU needed).

    python benchmarks/data.py --out /tmp/data_bench                       # 321 x 480 x 832, workers 1 and 4
    python benchmarks/data.py --out /tmp/data_bench --step-time 9.5       # also check "keeps a step fed"
    python benchmarks/data.py --quick --out /tmp/data_bench_quick         # CPU smoke run (tiny clips)

Float32 clips of 321x480x832 are 1.5 GB each and travel from workers through /dev/shm; uint8 clips are
4x smaller (convert on the GPU with data.clips.pixels_to_float).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.clips import available_frames  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.dataset import build_dataset, make_dataloader  # noqa: E402
from data.synthetic import write_synthetic_dataset  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def source_frames_needed(frames: int, src_fps: float, fps: float, margin: float) -> int:
    n = 1
    while available_frames(n, src_fps, fps) < frames:
        n += 1
    return int(n * (1 + margin))


def ensure_videos(folder: Path, num: int, frames: int, height: int, width: int, fps: float) -> float:
    """Write the synthetic set unless an identical one is there; returns seconds spent."""
    stamp = folder / "bench.json"
    want = {"num": num, "frames": frames, "height": height, "width": width, "fps": fps}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (folder / "metadata.jsonl").is_file():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_dataset(folder, num, frames, height, width, fps, seed=0, workers=os.cpu_count() or 1)
    stamp.write_text(json.dumps(want))
    return time.perf_counter() - t


def measure(cfg: DataConfig, workers: int, dtype: str, clips: int, seed: int) -> dict:
    t0 = time.perf_counter()
    ds, report = build_dataset(cfg, 4, seed, pixel_dtype=DTYPES[dtype])
    scan_s = time.perf_counter() - t0
    if len(ds) == 0:
        raise SystemExit(f"no clips: {report}")
    got, first, t_first = 0, None, 0.0
    epoch = 0
    start = time.perf_counter()
    while got < clips:
        loader = make_dataloader(ds, cfg, batch_size=1, seed=seed, epoch=epoch, num_workers=workers)
        for batch in loader:
            if batch["batch_size"] == 0:
                raise SystemExit(f"decode failed: {batch['failed']}")
            got += 1
            if first is None:
                first = time.perf_counter()
                t_first = first - start
            if got >= clips:
                break
        epoch += 1
    end = time.perf_counter()
    steady = (got - 1) / (end - first) if got > 1 else float("nan")
    shape = tuple(batch["pixels"].shape[1:])
    return {
        "workers": workers,
        "dtype": dtype,
        "clips": got,
        "clip_shape": list(shape),
        "mb_per_clip": batch["pixels"].element_size() * batch["pixels"].nelement() / 2**20,
        "scan_s": scan_s,
        "first_batch_s": t_first,
        "clips_per_s": steady,
        "s_per_clip": 1 / steady if steady else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/data_bench")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=321)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--size", default="480x832", help="target HxW")
    p.add_argument("--source-size", default="480x854", help="synthetic video HxW (16:9 480p)")
    p.add_argument("--source-fps", type=float, default=24.0)
    p.add_argument("--workers", default="1,4")
    p.add_argument("--dtypes", default="uint8,float32")
    p.add_argument("--clips", type=int, default=12, help="clips timed per setting")
    p.add_argument("--step-time", type=float, default=None, help="training step seconds of the recipe to check against")
    args = p.parse_args()
    if args.quick:
        args.videos, args.frames, args.size, args.source_size = 3, 33, "64x112", "72x128"
        args.workers, args.clips = "0,2", 6
    h, w = (int(x) for x in args.size.split("x"))
    sh, sw = (int(x) for x in args.source_size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_src = source_frames_needed(args.frames, args.source_fps, args.fps, margin=0.25)
    gen_s = ensure_videos(out / "videos", args.videos, n_src, sh, sw, args.source_fps)
    size_mb = sum(f.stat().st_size for f in (out / "videos").glob("*.mp4")) / 2**20 / args.videos
    cfg = DataConfig(path=str(out / "videos"), frames=args.frames, fps=args.fps, height=h, width=w, start="random")
    shm = shutil.disk_usage("/dev/shm").free / 2**30 if Path("/dev/shm").is_dir() else float("nan")
    print(f"# data pipeline: {args.videos} synthetic videos {sh}x{sw}, {n_src} frames at {args.source_fps:g} fps "
          f"(H.264, {size_mb:.1f} MB each; generated in {gen_s:.0f}s) -> clips of {args.frames} frames at "
          f"{args.fps:g} fps, {h}x{w}; {os.cpu_count()} CPUs, /dev/shm free {shm:.1f} GiB, torch {torch.__version__}\n")
    rows = []
    for dtype in args.dtypes.split(","):
        for workers in (int(x) for x in args.workers.split(",")):
            rec = measure(cfg, workers, dtype, args.clips, seed=0)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    lines = [
        "| workers | pixels | clip | MB/clip | clips/s | s/clip | first batch (s) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['dtype']} | {'x'.join(map(str, r['clip_shape']))} | {r['mb_per_clip']:.0f} | "
            f"{r['clips_per_s']:.2f} | {r['s_per_clip']:.2f} | {r['first_batch_s']:.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.step_time:
        need = 1 / args.step_time
        for r in rows:
            ok = "keeps up" if r["clips_per_s"] >= need else "TOO SLOW"
            print(f"workers={r['workers']} {r['dtype']}: {r['clips_per_s']:.3f} clips/s vs needed {need:.3f} -> {ok}")
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
