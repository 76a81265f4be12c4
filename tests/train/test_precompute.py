"""train/precompute.py end to end on a tiny random Wan and synthetic videos: the cache holds exactly
what the adapter computes for each clip, a rerun does nothing, and a changed recipe is refused."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from data.cache import LatentCacheDataset, cache_identity, check_manifest
from data.dataset import build_dataset
from train.config import load_config
from train.models.wan import WanAdapter
from train.precompute import main


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    cfg = {
        "model": {"family": "wan", "pretrained": str(root / "tiny-wan"), "create_tiny_random": True},
        "data": {
            "path": str(root / "videos"),
            "synthetic": {"num_videos": 3, "frames": 12, "height": 32, "width": 48, "fps": 16, "seed": 1},
            "frames": 9, "fps": 16, "height": 32, "width": 32, "num_workers": 0,
            "cache_dir": str(root / "cache"),
        },
        "train": {"mixed_precision": "no", "output_dir": str(root / "run")},
        "tracking": {"report_to": "none"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--dtype", "float32", "--shard-size", "2"]) == 0
    return path


def test_cache_holds_what_the_adapter_computes(recipe):
    cfg = load_config(str(recipe))
    ident = cache_identity(cfg.data, model_id=cfg.model.pretrained, revision=None, family="wan", dtype="float32")
    manifest = check_manifest(cfg.data.cache_dir, ident)
    assert manifest["count"] == 3 and manifest["num_shards"] == 2 and manifest["extra"]["frame_multiple"] == 4
    reader = LatentCacheDataset(cfg.data.cache_dir, ident)
    adapter = WanAdapter(cfg.model.pretrained, None, torch.float32)
    encoders = adapter.load_encoders(torch.device("cpu"))
    clips, _ = build_dataset(cfg.data, 4, seed=0)
    for i in range(3):
        item, clip = reader[i], clips[i]
        want = adapter.encode_videos(encoders, clip["pixels"][None])[0]
        assert item["latents"].shape == want.shape and item["latents"].shape[1:] == (3, 4, 4)  # 9 -> 3 frames, /8
        torch.testing.assert_close(item["latents"], want, atol=1e-5, rtol=1e-5)
        cond = adapter.encode_prompts(encoders, [clip["caption"]])
        assert set(item["cond"]) == set(cond)
        for name, value in cond.items():
            torch.testing.assert_close(item["cond"][name], value[0].float(), atol=1e-5, rtol=1e-5)


def test_rerun_is_a_no_op_and_other_setups_are_refused(recipe, capsys):
    cfg = load_config(str(recipe))
    shards = sorted((recipe.parent / "cache" / "shards").glob("*.safetensors"))
    before = [p.stat().st_mtime_ns for p in shards]
    assert main(["--config", str(recipe), "--dtype", "float32", "--shard-size", "2"]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == before
    assert "latent cache: 3 clips" in capsys.readouterr().out
    assert main(["--config", str(recipe), "--dtype", "float32", "--shard-size", "2", "data.height=48"]) == 2
    err = capsys.readouterr().err  # one error line (the differences follow it, one per line)
    assert re.search(r"(^|\n)error: .*holds a cache for a different setup;.*\n  height: cache has 32, expected 48", err, re.S)
    assert check_manifest(cfg.data.cache_dir, {"height": 32})["count"] == 3  # untouched
