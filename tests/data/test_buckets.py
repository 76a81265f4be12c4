"""Bucket parsing/assignment and the same-shape batch sampler (determinism, sharding, resume)."""

from __future__ import annotations

from collections import Counter

import pytest

from data.buckets import BucketBatchSampler, choose_bucket, parse_buckets


def test_parse_buckets_validates_and_dedupes():
    assert parse_buckets(81, 480, 832, [[161, 320, 576], [81, 480, 832]], 4) == [(81, 480, 832), (161, 320, 576)]
    with pytest.raises(ValueError, match=r"data\.frames=80 .*77 or 81"):
        parse_buckets(80, 480, 832, [], 4)
    with pytest.raises(ValueError, match=r"data\.buckets\[1\] frames=160 .*157 or 161"):
        parse_buckets(81, 480, 832, [[41, 480, 832], [160, 320, 576]], 4)
    with pytest.raises(ValueError, match=r"data\.buckets\[0\] must be \[frames, height, width\]"):
        parse_buckets(81, 480, 832, [[41, 480]], 4)
    with pytest.raises(ValueError, match=r"data\.buckets\[0\] must hold three positive ints"):
        parse_buckets(81, 480, 832, [[41, -1, 832]], 4)


def test_choose_bucket_prefers_frames_then_aspect_then_area():
    buckets = [(33, 32, 48), (17, 32, 48), (17, 48, 32), (65, 32, 48), (17, 16, 24)]
    assert choose_bucket(buckets, 40, 64, 96).index == 0  # longest that fits
    assert choose_bucket(buckets, 70, 64, 96).index == 3
    assert choose_bucket(buckets, 20, 96, 64).index == 2  # portrait video -> portrait bucket
    assert choose_bucket(buckets, 20, 64, 96).index == 1  # same aspect: the larger area
    short = choose_bucket(buckets, 16, 64, 96)
    assert (short.index, short.reason) == (None, "too_short") and "needs 17" in short.detail
    # aspect limit: a square video fits no bucket within 10%, though long enough
    wide = choose_bucket(buckets, 40, 64, 64, max_aspect_change=0.1)
    assert (wide.index, wide.reason) == (None, "aspect")
    assert choose_bucket(buckets, 40, 64, 64, max_aspect_change=0.6).index == 0


def _flatten(batches):
    return [i for b in batches for i in b]


def test_sampler_batches_one_bucket_and_covers_everything():
    ids = [0] * 7 + [1] * 5 + [2] * 1
    s = BucketBatchSampler(ids, 3, seed=1, with_epoch=False)
    batches = list(s)
    assert len(batches) == len(s) == 3 + 2 + 1
    assert all(len({ids[i] for i in b}) == 1 for b in batches)
    assert sorted(_flatten(batches)) == list(range(len(ids)))
    dropped = list(BucketBatchSampler(ids, 3, seed=1, drop_last=True, with_epoch=False))
    assert all(len(b) == 3 for b in dropped) and len(dropped) == 3


def test_sampler_is_deterministic_per_seed_and_epoch():
    ids = [i % 3 for i in range(60)]
    a, b = BucketBatchSampler(ids, 4, seed=5), BucketBatchSampler(ids, 4, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != list(b) and all(epoch == 1 for batch in e1 for _, epoch in batch)
    a.set_epoch(1)
    assert list(a) == e1
    assert list(BucketBatchSampler(ids, 4, seed=6)) != list(b)
    unshuffled = list(BucketBatchSampler(ids, 4, shuffle=False, with_epoch=False))
    assert unshuffled[0] == [0, 3, 6, 9]


def test_sampler_resumes_mid_epoch():
    ids = [i % 2 for i in range(40)]
    s = BucketBatchSampler(ids, 3, seed=0)
    s.set_epoch(2)
    full = list(s)
    state = s.state_dict(batches_consumed=5)
    t = BucketBatchSampler(ids, 3, seed=0)
    t.load_state_dict(state)
    assert len(t) == len(full) - 5
    assert list(t) == full[5:]
    assert list(t) == full  # the offset applies to one pass only
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(ids, 3, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_shards_evenly_across_ranks(world):
    ids = [0] * 9 + [1] * 4
    ranks = [BucketBatchSampler(ids, 2, seed=3, num_replicas=world, rank=r, with_epoch=False) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1  # every rank steps the same number of times
    seen = Counter(_flatten(_flatten(per_rank)))
    assert set(seen) == set(range(len(ids)))  # nothing lost (a few repeated to fill the last round)
    single = BucketBatchSampler(ids, 2, seed=3, with_epoch=False)
    assert _flatten(per_rank[0]) and per_rank[0][0] == list(single)[0]
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(ids, 2, num_replicas=2, rank=2)
