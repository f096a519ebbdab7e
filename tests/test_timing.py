"""Phase timing arithmetic and the job-wide summary, with hand-worked numbers."""

import numpy as np
import pytest
import torch

from pipeline.job.timing import StepTimer, rank_timing, summarize


def test_phases_tile_the_step():
    timer = StepTimer(torch.device("cpu"))
    marks = iter([0.0, 0.1, 0.5, 0.6, 0.7,   # step 1: data 0.1, fwd+bwd 0.4, comm 0.1, optimizer 0.1
                  0.9, 1.2, 1.2, 1.3])       # step 2 (starts at 0.7): data 0.2, fwd+bwd 0.3, comm 0.0, opt 0.1
    timer._now = lambda: next(marks)
    timer.start()
    for _ in range(2):
        timer.data_ready(); timer.grads_ready(); timer.backward_done(); timer.step_done()
    p = timer.phases()
    np.testing.assert_allclose(p, [[0.7, 0.1, 0.5, 0.1], [0.6, 0.2, 0.4, 0.0]], atol=1e-12)
    np.testing.assert_allclose(p[:, 0], p[:, 1:].sum(axis=1))


def test_summary_uses_the_slowest_rank():
    # two ranks, three steps after warm-up
    r0 = rank_timing(np.array([[9.0, 9, 0, 0], [1.0, 0.1, 0.7, 0.2], [1.0, 0.1, 0.7, 0.2], [2.0, 0.2, 1.4, 0.4]]), 1)
    r1 = rank_timing(np.array([[9.0, 9, 0, 0], [1.5, 0.1, 1.3, 0.1], [1.0, 0.1, 0.8, 0.1], [1.0, 0.1, 0.8, 0.1]]), 1)
    s = summarize([r0, r1], global_batch=64)
    assert s.timed_steps == 3
    assert s.timed_wall_s == pytest.approx(4.0)             # rank 0: 1 + 1 + 2
    assert s.throughput_samples_per_s == pytest.approx(64 * 3 / 4.0)
    assert s.throughput_per_rank_samples_per_s == pytest.approx(24.0)
    assert s.step_time_s.mean == pytest.approx((1.5 + 1.0 + 2.0) / 3)   # per-step max over ranks
    assert s.step_time_s.median == pytest.approx(1.5)
    assert s.breakdown_s.compute == pytest.approx((0.7 + 0.7 + 1.4) / 3 / 2 + (1.3 + 0.8 + 0.8) / 3 / 2)
    share = s.breakdown_share
    assert share.data + share.compute + share.comm == pytest.approx(1.0)


def test_no_timed_steps_gives_no_figures():
    r = rank_timing(np.ones((3, 4)), warmup=3)
    assert r.step_time_median_s is None
    assert summarize([r], 8).throughput_samples_per_s is None


def test_marks_are_read_in_chunks_and_none_are_lost():
    timer = StepTimer(torch.device("cpu"))
    timer.READ_EVERY = 4
    clock = iter(range(10_000))
    timer._now = lambda: float(next(clock))
    timer.start()
    for step in range(11):
        timer.data_ready(); timer.grads_ready(); timer.backward_done(); timer.step_done()
        assert len(timer._marks) < 2 * timer.READ_EVERY  # marks in hand stay bounded
    p = timer.phases()
    # every mark is one tick after the previous: data 1, fwd+bwd 1, comm 1, optimizer 1
    np.testing.assert_array_equal(p, np.tile([4.0, 1.0, 2.0, 1.0], (11, 1)))
    assert timer.phases(last=3).shape == (3, 4)
