"""Precomputed latents + text embeddings: safetensors shards and a manifest.

Layout of a cache folder::

    plan.json                       what is being computed (identity + item list digest); written first
    shards/shard-000000.safetensors tensors "<index>.latents" and "<index>.cond.<name>", item records in
                                    the header metadata; written to a temp name, then renamed
    manifest.json                   written last, once every shard exists: identity, count, item index

Work is cut into fixed shards of ``shard_size`` items; rank r of w encodes shards s with s % w == r,
so several GPUs (accelerate processes) share the work, and a rerun after a crash skips every shard
already on disk. The encoders are passed in as callables: this module knows nothing of models.

Training compares the manifest with what the recipe expects (``check_manifest``) and refuses a
cache made for another model, resolution, frame count, fps or dtype, naming each difference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from data.config import DataConfig

FORMAT = "longvideo-sparse-ft/latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARDS = "shards"

EncodeVideos = Callable[[torch.Tensor], torch.Tensor]
EncodePrompts = Callable[[list[str]], Mapping[str, torch.Tensor]]


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return str(dtype)


def cache_identity(
    cfg: DataConfig,
    *,
    model_id: str,
    revision: Optional[str],
    family: str,
    dtype: Union[str, torch.dtype],
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Everything that decides a cache's content. Precompute stores it; training rebuilds it from the
    recipe and passes it to ``check_manifest``, so both sides must call this same function."""
    ident: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"id": model_id, "revision": revision, "family": family},
        "dtype": _dtype_name(dtype),
        "frames": cfg.frames,
        "height": cfg.height,
        "width": cfg.width,
        "fps": float(cfg.fps),
        "buckets": [list(b) for b in cfg.buckets],
        "data": {
            "path": cfg.path,
            "split": cfg.split,
            "video_column": cfg.video_column,
            "caption_column": cfg.caption_column,
            "start": cfg.start,
            "clips_per_video": cfg.clips_per_video,
            "crop": cfg.crop,
            "max_aspect_change": cfg.max_aspect_change,
        },
    }
    if extra:
        ident["extra"] = dict(extra)
    return _jsonable(ident)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    return json.loads(json.dumps(obj))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_identity(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Lines 'key: cache has X, expected Y' for every key of ``want`` that ``have`` lacks or differs on."""
    have_f, want_f = flatten(_jsonable(have)), flatten(_jsonable(want))
    missing = object()
    lines = []
    for key, value in want_f.items():
        got = have_f.get(key, missing)
        if got is missing:
            lines.append(f"  {key}: missing from the cache, expected {value!r}")
        elif got != value:
            lines.append(f"  {key}: cache has {got!r}, expected {value!r}")
    return lines


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def check_manifest(cache_dir: Union[str, Path], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Load the manifest; raise ValueError naming every field that differs from ``expected``."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        if (cache_dir / PLAN).is_file():
            plan = _read_json(cache_dir / PLAN)
            done = len(list((cache_dir / SHARDS).glob("shard-*.safetensors")))
            raise ValueError(
                f"data.cache_dir={str(cache_dir)!r} is incomplete ({done} of {plan['num_shards']} shards, no "
                f"{MANIFEST}): rerun the precompute command to finish it"
            )
        raise ValueError(f"data.cache_dir={str(cache_dir)!r} holds no latent cache ({MANIFEST} not found)")
    manifest = _read_json(manifest_path)
    diffs = diff_identity(manifest, expected)
    if diffs:
        raise ValueError(
            f"the latent cache in {cache_dir} was made for a different setup; differences:\n"
            + "\n".join(diffs)
            + "\nrerun precompute into another data.cache_dir (or fix the recipe)"
        )
    return manifest


# -- writing ---------------------------------------------------------------------------------


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / SHARDS / f"shard-{shard:06d}.safetensors"


def _digest(item_ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in item_ids:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()


def _shard_is_valid(path: Path, shard: int, digest: str) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable leftover: recompute it
        return False
    return meta.get("plan_digest") == digest and meta.get("shard") == str(shard)


def _to_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()


def write_cache(
    cache_dir: Union[str, Path],
    dataset: Dataset,
    encode_videos: EncodeVideos,
    encode_prompts: EncodePrompts,
    identity: Mapping[str, Any],
    *,
    shard_size: int = 32,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    barrier: Optional[Callable[[], None]] = None,
    overwrite: bool = False,
    extra_manifest: Optional[Mapping[str, Any]] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> Optional[Path]:
    """Encode this rank's shards of ``dataset`` (a ClipDataset) and, on rank 0, finalise the manifest.

    ``encode_videos``: [B, 3, F, H, W] in [-1, 1] -> latents [B, ...]; ``encode_prompts``: list of
    captions -> dict of batch-first tensors. Shards already on disk for the same plan are kept
    (resume). With world_size > 1 pass ``barrier`` (e.g. ``accelerator.wait_for_everyone``) so rank 0
    finalises after everyone; without it rank 0 finalises only if every shard exists. Clips that fail
    to decode are left out and listed in the manifest under "failed". Returns the manifest path on
    rank 0, else None.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    cache_dir = Path(cache_dir)
    identity = _jsonable(identity)
    dtype = getattr(torch, identity["dtype"])
    item_ids = list(dataset.item_ids)  # type: ignore[attr-defined]
    num_shards = max(1, math.ceil(len(item_ids) / shard_size))
    clip_shapes = [list(b) for b in dataset.buckets]  # type: ignore[attr-defined]
    plan = {**identity, "clip_shapes": clip_shapes, "num_items": len(item_ids), "shard_size": shard_size,
            "num_shards": num_shards, "plan_digest": _digest(item_ids + [json.dumps(clip_shapes)])}
    _outdated(cache_dir, plan, overwrite)  # on every rank, before anyone waits at the barrier
    if rank == 0 or barrier is None:
        _prepare_dir(cache_dir, plan, overwrite, rank)
    if barrier is not None:
        barrier()  # rank 0 has replaced an outdated cache before anyone writes shards
        if rank != 0 and diff_identity(_read_json(cache_dir / PLAN), plan):
            raise RuntimeError(f"rank {rank} computed a different plan than rank 0 for {cache_dir}: datasets differ")

    loader_ds = copy.copy(dataset)
    if hasattr(loader_ds, "max_retries"):
        loader_ds.max_retries = 0  # a failed clip is recorded, not replaced by a duplicate of another
    for shard in range(rank, num_shards, world_size):
        path = _shard_path(cache_dir, shard)
        if path.is_file() and _shard_is_valid(path, shard, plan["plan_digest"]):
            continue
        _encode_shard(path, shard, plan, loader_ds, encode_videos, encode_prompts, dtype, batch_size, num_workers, on_batch)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return finalize_cache(cache_dir, extra_manifest)


def _outdated(cache_dir: Path, plan: dict[str, Any], overwrite: bool) -> list[str]:
    """Differences between the cache's plan and ``plan``; raises when they exist and ``overwrite`` is off.
    Read-only, so every rank can check before the barrier (no rank then waits for one that failed)."""
    plan_path = cache_dir / PLAN
    diffs = diff_identity(_read_json(plan_path), plan) if plan_path.is_file() else []
    if diffs and not overwrite:
        raise ValueError(
            f"{cache_dir} holds a cache for a different setup; differences:\n" + "\n".join(diffs)
            + "\nuse another cache folder or pass overwrite (--overwrite) to replace it"
        )
    return diffs


def _prepare_dir(cache_dir: Path, plan: dict[str, Any], overwrite: bool, rank: int) -> None:
    plan_path = cache_dir / PLAN
    if plan_path.is_file():
        diffs = _outdated(cache_dir, plan, overwrite)
        if diffs and overwrite and rank == 0:
            shutil.rmtree(cache_dir / SHARDS, ignore_errors=True)
            (cache_dir / MANIFEST).unlink(missing_ok=True)
    (cache_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    if rank == 0 or not plan_path.is_file():
        _write_json(plan_path, plan)  # identical content on every rank: the rename makes the race harmless


def _encode_shard(
    path: Path,
    shard: int,
    plan: dict[str, Any],
    dataset: Dataset,
    encode_videos: EncodeVideos,
    encode_prompts: EncodePrompts,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
    on_batch: Optional[Callable[[int, int], None]],
) -> None:
    lo = shard * plan["shard_size"]
    hi = min(lo + plan["shard_size"], plan["num_items"])
    bucket_ids = dataset.bucket_ids  # type: ignore[attr-defined]
    batches: list[list[tuple[int, int]]] = []
    for bucket in dict.fromkeys(bucket_ids[lo:hi]):  # same-shape batches, first-seen bucket order
        members = [i for i in range(lo, hi) if bucket_ids[i] == bucket]
        batches += [[(i, 0) for i in members[s : s + batch_size]] for s in range(0, len(members), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=num_workers)  # type: ignore[attr-defined]
    tensors: dict[str, torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    with torch.no_grad():
        for batch in loader:
            failed += batch["failed"]
            if batch["batch_size"]:
                latents = encode_videos(batch["pixels"])
                cond = encode_prompts(list(batch["captions"]))
                for j, index in enumerate(batch["indices"]):
                    tensors[f"{index}.latents"] = _to_storage(latents[j], dtype)
                    for name, value in cond.items():
                        tensors[f"{index}.cond.{name}"] = _to_storage(value[j], dtype)
                    records.append({
                        "index": index,
                        "key": batch["keys"][j],
                        "caption": batch["captions"][j],
                        "clip": batch["clips"][j],
                        "bucket": batch["bucket_indices"][j],
                    })
            if on_batch is not None:
                on_batch(shard, len(records))
    records.sort(key=lambda r: r["index"])
    meta = {
        "format": FORMAT,
        "shard": str(shard),
        "plan_digest": plan["plan_digest"],
        "items": json.dumps(records),
        "failed": json.dumps(failed),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; caches are often shared
    os.replace(tmp, path)


def finalize_cache(cache_dir: Union[str, Path], extra_manifest: Optional[Mapping[str, Any]] = None) -> Path:
    """Write manifest.json from plan.json and the shard headers; raises if a shard is missing."""
    cache_dir = Path(cache_dir)
    plan = _read_json(cache_dir / PLAN)
    missing = [s for s in range(plan["num_shards"]) if not _shard_path(cache_dir, s).is_file()]
    if missing:
        raise RuntimeError(
            f"cannot finalise {cache_dir}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are missing "
            f"({len(missing)} of {plan['num_shards']}); run every rank (or rerun to resume)"
        )
    items: list[list[Any]] = []
    failed: list[dict[str, str]] = []
    for s in range(plan["num_shards"]):
        path = _shard_path(cache_dir, s)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("plan_digest") != plan["plan_digest"]:
            raise RuntimeError(f"{path} belongs to another plan; delete it and rerun precompute")
        for r in json.loads(meta["items"]):
            items.append([s, r["index"], r["bucket"], r["key"], r["caption"]])
        failed += json.loads(meta["failed"])
    for leftover in (cache_dir / SHARDS).glob(".shard-*.tmp*"):  # debris of killed runs; every rank is done
        leftover.unlink(missing_ok=True)
    manifest = {k: v for k, v in plan.items()}
    manifest.update({
        "count": len(items),
        "failed": failed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "item_fields": ["shard", "index", "bucket", "key", "caption"],
        "items": items,
    })
    if extra_manifest:
        manifest["extra"] = {**manifest.get("extra", {}), **_jsonable(extra_manifest)}
    _write_json(cache_dir / MANIFEST, manifest)
    return cache_dir / MANIFEST


# -- reading ---------------------------------------------------------------------------------


def open_cache(
    cfg: DataConfig,
    *,
    model_id: str,
    revision: Optional[str],
    family: str,
    dtype: Union[str, torch.dtype, None] = None,
) -> tuple["LatentCacheDataset", Any]:
    """The cache at ``cfg.cache_dir`` checked against the recipe, plus the SkipReport of the scan that
    made it (with the clips that failed to decode during precompute). ``dtype=None``: any storage dtype."""
    from data.dataset import SkipReport  # the report type lives with the clip dataset

    if not cfg.cache_dir:
        raise ValueError("data.cache_dir is not set")
    expected = cache_identity(cfg, model_id=model_id, revision=revision, family=family, dtype=dtype or "float32")
    if dtype is None:
        expected.pop("dtype")
    dataset = LatentCacheDataset(cfg.cache_dir, expected)
    saved = dataset.manifest.get("extra", {}).get("skip_report")
    report = SkipReport.from_dict(saved) if saved else SkipReport(videos=len(dataset), kept=len(dataset))
    report.clips = len(dataset)
    report.record_failures(dataset.manifest.get("failed", []))
    return dataset, report


class LatentCacheDataset(Dataset):
    """Items of a finished cache: {"latents": [C, T, h, w], "cond": {name: tensor}, "caption", "key",
    "bucket_index", "clip_shape": (F, H, W) pixel shape of the clip, "index"}.
    Refuses a cache whose manifest differs from ``expected``."""

    def __init__(self, cache_dir: Union[str, Path], expected: Optional[Mapping[str, Any]] = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = check_manifest(self.cache_dir, expected or {})
        self.items = self.manifest["items"]
        self.clip_shapes = [tuple(int(x) for x in shape) for shape in self.manifest["clip_shapes"]]
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def bucket_ids(self) -> list[int]:
        return [int(r[2]) for r in self.items]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # open safetensors handles stay in their process
        return state

    def _file(self, shard: int) -> Any:
        if shard not in self._files:
            self._files[shard] = safe_open(str(_shard_path(self.cache_dir, shard)), framework="pt")
        return self._files[shard]

    def __getitem__(self, idx: Union[int, tuple[int, int]]) -> dict[str, Any]:
        i = idx[0] if isinstance(idx, tuple) else int(idx)
        shard, index, bucket, key, caption = self.items[i]
        f = self._file(shard)
        prefix = f"{index}.cond."
        cond = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        return {
            "latents": f.get_tensor(f"{index}.latents"),
            "cond": cond,
            "caption": caption,
            "key": key,
            "bucket_index": bucket,
            "clip_shape": self.clip_shapes[bucket],
            "index": index,
        }

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_latents(items)


def collate_latents(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"latents": [B, C, T, h, w], "cond": {name: [B, ...]}, "captions", "keys", "indices",
    "clip_shape": (F, H, W), "batch_size", "failed": []}."""
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}; use BucketBatchSampler (or batch_size=1)")
    names = list(items[0]["cond"]) if items else []
    cond = {}
    for name in names:
        shapes = {tuple(it["cond"][name].shape) for it in items}
        if len(shapes) > 1:
            raise ValueError(f"text conditioning {name!r} has different shapes in one batch: {sorted(shapes)}")
        cond[name] = torch.stack([it["cond"][name] for it in items])
    return {
        "latents": torch.stack([it["latents"] for it in items]) if items else None,
        "cond": cond,
        "captions": [it["caption"] for it in items],
        "keys": [it["key"] for it in items],
        "indices": [it.get("index") for it in items],
        "clip_shape": items[0].get("clip_shape") if items else None,
        "batch_size": len(items),
        "failed": [],
    }
