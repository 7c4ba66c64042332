"""Curricula: the weights, draw frequencies against (batches left) x weight (chi-square, first and
second draw computed exactly), exhausted buckets, cycles, and purity in (seed, step)."""

import numpy as np
import pytest

from kiln.data.curriculum import Curriculum, apportion, bucket_weights, epoch_order
from tests.data.chisq import chisq_pvalue


def test_named_weights():
    assert bucket_weights("natural", 3).tolist() == [1, 1, 1]
    assert bucket_weights("grow_p2", 6).tolist() == [32, 16, 8, 4, 2, 1]
    assert bucket_weights("grow_linear", 4).tolist() == [4, 3, 2, 1]
    assert bucket_weights("weights", 2, [0.5, 3]).tolist() == [0.5, 3]
    with pytest.raises(ValueError, match="one per bucket"):
        bucket_weights("weights", 3, [1, 2])
    with pytest.raises(ValueError, match="positive"):
        bucket_weights("weights", 2, [1, 0])


def _draws(batches, weights, n, first_steps=2):
    out = np.empty((n, first_steps), np.int64)
    for s in range(n):
        out[s] = epoch_order(batches, weights, 1, np.random.default_rng([99, s]))[:first_steps]
    return out


def test_draws_are_proportional_to_batches_left_times_weight():
    batches, weights = np.array([3, 6, 4, 2]), bucket_weights("grow_p2", 4)  # 8, 4, 2, 1
    draws = _draws(batches, weights, 4000)
    p1 = batches * weights / (batches * weights).sum()
    assert chisq_pvalue(np.bincount(draws[:, 0], minlength=4), 4000 * p1) > 1e-3
    # the second draw, exactly: the first took one batch from its bucket
    p2 = np.zeros(4)
    for i in range(4):
        left = batches.copy()
        left[i] -= 1
        p2 += p1[i] * left * weights / (left * weights).sum()
    assert chisq_pvalue(np.bincount(draws[:, 1], minlength=4), 4000 * p2) > 1e-3


def test_explicit_weights_frequencies():
    batches, weights = np.array([100, 100, 100]), np.array([1.0, 3.0, 6.0])
    draws = _draws(batches, weights, 3000, 1)[:, 0]
    assert chisq_pvalue(np.bincount(draws, minlength=3), 3000 * weights / weights.sum()) > 1e-3


def test_every_batch_once_and_exhausted_buckets_drop_out():
    batches = np.array([5, 0, 7, 1])
    order = epoch_order(batches, bucket_weights("grow_p2", 4), 3, np.random.default_rng(0))
    assert np.bincount(order, minlength=4).tolist() == batches.tolist()  # 0-batch bucket never drawn


def test_cycles_run_short_to_long():
    batches, C = np.array([400, 200, 100, 50]), 4
    order = epoch_order(batches, bucket_weights("grow_p2", 4), C, np.random.default_rng(3))
    start = 0
    for c in range(C):
        part = batches * (c + 1) // C - batches * c // C
        seg = order[start:start + part.sum()]
        start += part.sum()
        assert np.bincount(seg, minlength=4).tolist() == part.tolist()  # each cycle: its share
        mean_pos = [np.flatnonzero(seg == b).mean() for b in range(4)]
        assert mean_pos == sorted(mean_pos)  # short buckets early, long ones late, in every cycle


def test_curriculum_is_a_pure_function_of_seed_and_step():
    a = Curriculum([4, 3, 2], [4, 2, 1], 2, seed=7)
    b = Curriculum([4, 3, 2], [4, 2, 1], 2, seed=7)
    steps = list(range(40))[::-1]  # b is asked in another order
    got_b = {s: b.at(s) for s in steps}
    assert [a.at(s) for s in range(40)] == [got_b[s] for s in range(40)]
    e0, e1 = a.buckets(0, 9), a.buckets(9, 18)
    assert sorted(e0) == sorted(e1) and a.at(9)[2] == 1  # epoch 1 reuses the mix, new order
    # within an epoch, the j-th step of a bucket uses its batch j
    for bucket in range(3):
        nths = [a.at(s)[1] for s in range(9) if a.at(s)[0] == bucket]
        assert nths == list(range(len(nths)))
    assert Curriculum([4, 3, 2], [4, 2, 1], 2, seed=8).buckets(0, 9).tolist() != e0.tolist()


def test_a_short_run_gets_the_natural_mix_and_the_whole_curriculum():
    batches = np.array([300, 200, 120, 80])
    assert apportion(batches, 0).tolist() == batches.tolist()
    assert apportion(batches, 10_000).tolist() == batches.tolist()
    assert apportion(batches, 70).tolist() == [30, 20, 12, 8]
    share = apportion(batches, 77)
    assert share.sum() == 77 and np.all(np.abs(share - batches * 77 / 700) < 1)
    c = Curriculum(batches, bucket_weights("grow_p2", 4), 2, seed=0, horizon=70)
    assert c.steps_per_epoch == 70
    first, second = c.buckets(0, 35), c.buckets(35, 70)
    for seg in (first, second):  # both cycles inside the run, each short to long
        assert np.bincount(seg, minlength=4).tolist() == [15, 10, 6, 4]
        assert seg[:10].mean() < seg[-10:].mean()
