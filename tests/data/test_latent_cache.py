"""The latent cache: round trip, resume after a kill, sharding over ranks, refusal of a mismatched cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data.cache import (
    MANIFEST,
    LatentCacheDataset,
    cache_identity,
    check_manifest,
    collate_latents,
    finalize_cache,
    open_cache,
    write_cache,
)
from data.config import DataConfig
from data.dataset import build_dataset, make_dataloader
from video_helpers import fake_encode_prompts, fake_encode_videos, write_metadata

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def _cfg(path) -> DataConfig:
    return DataConfig(path=str(path), frames=9, fps=16, height=16, width=24, num_workers=0,
                      start="chunks", clips_per_video=2, buckets=[[5, 16, 16]])


def _ident(cfg, **kw):
    args = dict(model_id="tiny/wan", revision="abc123", family="wan", dtype="bfloat16")
    args.update(kw)
    return cache_identity(cfg, **args)


@pytest.fixture(scope="module")
def clips(synthetic_dir):
    cfg = _cfg(synthetic_dir)
    ds, report = build_dataset(cfg, 4, seed=0)
    assert len(ds) == 12  # 6 videos x 2 chunks
    return cfg, ds, report


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, px):
        self.calls += px.shape[0]
        return fake_encode_videos(px)


def _all_tensors(cache_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted((cache_dir / "shards").glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_round_trip_matches_direct_encoding(tmp_path, clips):
    cfg, ds, report = clips
    ident = _ident(cfg)
    manifest_path = write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, ident,
                                shard_size=5, batch_size=2, extra_manifest={"skip_report": asdict(report)})
    assert manifest_path == tmp_path / "c" / MANIFEST
    manifest = check_manifest(tmp_path / "c", ident)
    assert manifest["count"] == 12 and manifest["num_shards"] == 3 and manifest["failed"] == []
    assert manifest["model"] == {"id": "tiny/wan", "revision": "abc123", "family": "wan"}
    assert (manifest["frames"], manifest["height"], manifest["width"], manifest["fps"]) == (9, 16, 24, 16.0)
    assert manifest["clip_shapes"] == [[9, 16, 24], [5, 16, 16]]
    cached_cfg = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c")})
    reader, cached_report = open_cache(cached_cfg, model_id="tiny/wan", revision="abc123", family="wan")
    assert cached_report.as_dict() == report.as_dict() and "12 clips" in str(cached_report)
    assert len(reader) == 12 and reader.bucket_ids == ds.bucket_ids
    for i in range(12):
        item, clip = reader[i], ds[i]
        assert item["key"] == clip["key"] and item["caption"] == clip["caption"]
        assert item["clip_shape"] == clip["bucket"] == (9, 16, 24)
        want = fake_encode_videos(clip["pixels"][None])[0].to(torch.bfloat16)
        assert item["latents"].dtype == torch.bfloat16 and item["latents"].shape == (4, 3, 2, 3)
        torch.testing.assert_close(item["latents"], want, atol=0, rtol=0)
        cond = fake_encode_prompts([clip["caption"]])
        torch.testing.assert_close(item["cond"]["prompt_embeds"], cond["prompt_embeds"][0].to(torch.bfloat16))
        assert item["cond"]["attention_mask"].dtype == torch.bool
        assert torch.equal(item["cond"]["attention_mask"], cond["attention_mask"][0])
    # the reader goes through the same bucket sampler and worker processes as the clip dataset
    loader = make_dataloader(reader, batch_size=3, num_workers=2, seed=1)
    batches = list(loader)
    assert sum(b["batch_size"] for b in batches) == 12
    assert all(b["latents"].shape[1:] == (4, 3, 2, 3) for b in batches)
    assert batches[0]["cond"]["prompt_embeds"].shape[1:] == (6, 3) and batches[0]["clip_shape"] == (9, 16, 24)


def test_mismatched_cache_is_refused_naming_each_difference(tmp_path, clips):
    cfg, ds, _ = clips
    write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg), shard_size=6)
    other = DataConfig(**{**cfg.__dict__, "frames": 13, "height": 32})
    want = _ident(other, model_id="tiny/hunyuan", family="hunyuan_video", dtype="float32")
    with pytest.raises(ValueError) as err:
        LatentCacheDataset(tmp_path / "c", want)
    msg = str(err.value)
    for line in ("model.id: cache has 'tiny/wan', expected 'tiny/hunyuan'",
                 "model.family: cache has 'wan', expected 'hunyuan_video'",
                 "dtype: cache has 'bfloat16', expected 'float32'",
                 "frames: cache has 9, expected 13", "height: cache has 16, expected 32"):
        assert line in msg
    assert "revision" not in msg and "fps" not in msg  # only what differs
    with pytest.raises(ValueError, match="holds no latent cache"):
        check_manifest(tmp_path / "nothing", want)
    # writing another setup into the same folder is refused too, unless overwrite
    with pytest.raises(ValueError, match=r"different setup;.*\n  model.id: cache has 'tiny/wan'"):
        write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg, model_id="x/y"))
    write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg, model_id="x/y"), overwrite=True)
    assert check_manifest(tmp_path / "c", _ident(cfg, model_id="x/y"))["count"] == 12


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from data.cache import cache_identity, write_cache
    from data.config import DataConfig
    from data.dataset import build_dataset
    from video_helpers import fake_encode_prompts, fake_encode_videos

    folder, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = DataConfig(path=folder, frames=9, fps=16, height=16, width=24, num_workers=0,
                     start="chunks", clips_per_video=2, buckets=[[5, 16, 16]])
    ds, _ = build_dataset(cfg, 4, seed=0)
    calls = 0
    def encode(px):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: a real crash
        return fake_encode_videos(px)
    ident = cache_identity(cfg, model_id="tiny/wan", revision="abc123", family="wan", dtype="bfloat16")
    write_cache(out, ds, encode, fake_encode_prompts, ident, shard_size=2)
""")


def test_resume_after_kill_keeps_finished_shards(tmp_path, clips, synthetic_dir):
    cfg, ds, _ = clips
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    proc = subprocess.run([sys.executable, str(script), str(synthetic_dir), str(tmp_path / "c"), "6"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    shards = sorted((tmp_path / "c" / "shards").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert not (tmp_path / "c" / MANIFEST).exists()
    with pytest.raises(ValueError, match=r"incomplete \(2 of 6 shards, no manifest.json\): rerun"):
        check_manifest(tmp_path / "c", _ident(cfg))
    # debris of other crashes: a temp file and an unreadable shard under a final name
    (tmp_path / "c" / "shards" / ".shard-000003.safetensors.tmp4242").write_bytes(b"partial")
    (tmp_path / "c" / "shards" / "shard-000004.safetensors").write_bytes(b"not a safetensors file")
    kept = {p.name: p.stat().st_mtime_ns for p in shards}
    enc = Counting()
    write_cache(tmp_path / "c", ds, enc, fake_encode_prompts, _ident(cfg), shard_size=2)
    assert enc.calls == 12 - 4  # only the 4 unfinished shards were encoded
    assert {p.name: p.stat().st_mtime_ns for p in shards} == kept
    assert not list((tmp_path / "c" / "shards").glob(".*tmp*"))
    write_cache(tmp_path / "fresh", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg), shard_size=2)
    resumed, fresh = _all_tensors(tmp_path / "c"), _all_tensors(tmp_path / "fresh")
    assert resumed.keys() == fresh.keys() and len(resumed) == 36
    for k in fresh:
        assert torch.equal(resumed[k], fresh[k]), k
    assert check_manifest(tmp_path / "c", _ident(cfg))["count"] == 12


def test_ranks_share_the_work(tmp_path, clips):
    cfg, ds, _ = clips
    ident = _ident(cfg)
    with pytest.raises(RuntimeError, match=r"shards \[1, 3, 5\] are missing"):
        write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, ident, shard_size=2, rank=0, world_size=2)
    enc1 = Counting()
    assert write_cache(tmp_path / "c", ds, enc1, fake_encode_prompts, ident, shard_size=2, rank=1, world_size=2) is None
    enc0 = Counting()
    write_cache(tmp_path / "c", ds, enc0, fake_encode_prompts, ident, shard_size=2, rank=0, world_size=2)
    assert (enc0.calls, enc1.calls) == (0, 6)  # rank 0's shards were already written by its first run
    assert len(LatentCacheDataset(tmp_path / "c", ident)) == 12
    finalize_cache(tmp_path / "c")  # idempotent


def test_decode_failures_are_left_out_and_listed(tmp_path, make_video):
    folder = tmp_path / "v"
    make_video("ok.mp4", frames=20, folder=folder)
    cut = make_video("cut.mp4", frames=30, content="noise", faststart=True, folder=folder)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    write_metadata(folder, [{"file_name": "ok.mp4", "caption": "fine"}, {"file_name": "cut.mp4", "caption": "cut"}])
    cfg = DataConfig(path=str(folder), frames=17, fps=16, height=16, width=16, num_workers=0)
    ds, _ = build_dataset(cfg, 4, seed=0)
    assert len(ds) == 2
    write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg), batch_size=2)
    manifest = check_manifest(tmp_path / "c", _ident(cfg))
    assert manifest["count"] == 1 and [f["key"] for f in manifest["failed"]] == ["cut.mp4"]
    assert LatentCacheDataset(tmp_path / "c")[0]["key"] == "ok.mp4"
    _, report = open_cache(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c")}),
                           model_id="tiny/wan", revision="abc123", family="wan", dtype="bfloat16")
    assert report.decode_failures == 1 and list(report.failed_videos) == ["cut.mp4"]
    with pytest.raises(ValueError, match="dtype: cache has 'bfloat16', expected 'float32'"):
        open_cache(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "c")}),
                   model_id="tiny/wan", revision="abc123", family="wan", dtype=torch.float32)


def test_collate_latents_rejects_mixed_shapes():
    a = {"latents": torch.zeros(4, 2, 2, 2), "cond": {"e": torch.zeros(3)}, "caption": "a", "key": "a"}
    b = {"latents": torch.zeros(4, 3, 2, 2), "cond": {"e": torch.zeros(3)}, "caption": "b", "key": "b"}
    assert collate_latents([a, a])["latents"].shape == (2, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="mixes latent shapes"):
        collate_latents([a, b])


def test_edited_caption_is_not_served_from_a_stale_cache(tmp_path, clips):
    import dataclasses

    cfg, ds, _ = clips
    write_cache(tmp_path / "c", ds, fake_encode_videos, fake_encode_prompts, _ident(cfg), shard_size=2)
    edited = copy.copy(ds)
    edited.entries = [dataclasses.replace(e, caption=e.caption + " (fixed)") if i == 0 else e for i, e in enumerate(ds.entries)]
    assert edited.item_ids[0] != ds.item_ids[0] and edited.item_ids[1:] == ds.item_ids[1:]
    try:  # the cache must either re-encode or refuse; silently keeping the old caption is the bug
        write_cache(tmp_path / "c", edited, fake_encode_videos, fake_encode_prompts, _ident(cfg), shard_size=2)
    except ValueError as err:
        assert "overwrite" in str(err) or "differ" in str(err), err
        return
    with open(tmp_path / "c" / MANIFEST) as fh:
        assert json.load(fh)["count"] == 12
    cache, _ = open_cache(cfg, model_id="tiny/wan", revision="abc123", family="wan")
    assert any(cache[i]["caption"].endswith("(fixed)") for i in range(len(cache)))
