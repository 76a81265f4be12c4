"""(frames, height, width) buckets and a batch sampler that never mixes shapes in a batch.

A video goes to the largest bucket it fits: the most frames it can supply at the target fps, then the
closest aspect ratio, then the largest area. A video that fits no bucket is skipped with the reason
(too short for every bucket, or too far in aspect from every bucket it is long enough for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Sampler

from data.clips import aspect_change, check_frame_count

Bucket = tuple[int, int, int]  # (frames, height, width)


def parse_buckets(
    frames: int, height: int, width: int, extra: Sequence[Sequence[int]], frame_multiple: int
) -> list[Bucket]:
    """The recipe's main clip shape followed by ``data.buckets``, validated and de-duplicated."""
    check_frame_count(frames, frame_multiple, "data.frames")
    buckets: list[Bucket] = []
    for i, shape in enumerate([(frames, height, width), *extra]):
        name = "data.frames/height/width" if i == 0 else f"data.buckets[{i - 1}]"
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise ValueError(f"{name} must be [frames, height, width], got {shape!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape):
            raise ValueError(f"{name} must hold three positive ints [frames, height, width], got {list(shape)!r}")
        check_frame_count(shape[0], frame_multiple, f"{name} frames")
        bucket = (int(shape[0]), int(shape[1]), int(shape[2]))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


@dataclass(frozen=True)
class BucketChoice:
    index: Optional[int]  # None: skipped
    reason: Optional[str] = None  # "too_short" or "aspect" when skipped
    detail: str = ""


def choose_bucket(
    buckets: Sequence[Bucket], available: int, src_h: int, src_w: int, max_aspect_change: float = 0.0
) -> BucketChoice:
    """Pick the bucket for a video that can supply ``available`` frames at the target fps."""
    long_enough = [i for i, b in enumerate(buckets) if b[0] <= available]
    if not long_enough:
        need = min(b[0] for b in buckets)
        return BucketChoice(None, "too_short", f"{available} frames at the target fps, the shortest bucket needs {need}")
    changes = {i: aspect_change(src_h, src_w, buckets[i][1], buckets[i][2]) for i in long_enough}
    fits = [i for i in long_enough if max_aspect_change <= 0 or changes[i] <= max_aspect_change]
    if not fits:
        best = min(changes.values())
        return BucketChoice(
            None, "aspect", f"{src_w}x{src_h} differs by {best:.3f} from every bucket (max_aspect_change {max_aspect_change})"
        )
    i = max(fits, key=lambda j: (buckets[j][0], -changes[j], buckets[j][1] * buckets[j][2]))
    return BucketChoice(i)


class BucketBatchSampler(Sampler[list]):
    """Batches of dataset indices that all share one bucket.

    Deterministic given (seed, epoch): each bucket's indices are shuffled and cut into batches, then
    the batches of all buckets are shuffled together. With ``num_replicas`` > 1 every rank gets the
    same number of batches (the list wraps around to fill) and takes every ``num_replicas``-th one;
    alternatively leave num_replicas=1 and let ``accelerate`` shard the batches.

    Items are yielded as ``(index, epoch)`` pairs when ``with_epoch`` is True, so the dataset draws
    the same random start/crop for a clip in a given epoch whichever worker loads it (and on resume).
    Resume mid-epoch with ``set_epoch(epoch, start_batch=batches_already_consumed)``.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        with_epoch: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` skips the batches of this rank already consumed (resume)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def state_dict(self, batches_consumed: int) -> dict[str, int]:
        """What to store in a checkpoint; the trainer passes how many batches it consumed this epoch
        (the sampler itself runs ahead of training because the loader prefetches)."""
        return {"epoch": self.epoch, "start_batch": batches_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler seed differs from the checkpoint: {self.seed} != {state['seed']}")
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch (all ranks), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for bucket in np.unique(self.bucket_ids):
            idx = np.flatnonzero(self.bucket_ids == bucket)
            if self.shuffle:
                idx = rng.permutation(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append([int(i) for i in chunk])
        if self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch (before ``start_batch`` is applied)."""
        batches = self.all_batches(epoch)
        if self.num_replicas == 1 or not batches:
            return batches
        per_rank = -(-len(batches) // self.num_replicas)
        total = per_rank * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(total)]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[Union[int, tuple[int, int]]]]:
        epoch, skip = self.epoch, self.start_batch
        self.start_batch = 0  # a resume offset applies to one pass only
        for batch in self.rank_batches(epoch)[skip:]:
            yield [(i, epoch) for i in batch] if self.with_epoch else list(batch)

    def __len__(self) -> int:
        return max(len(self.rank_batches(self.epoch)) - self.start_batch, 0)
