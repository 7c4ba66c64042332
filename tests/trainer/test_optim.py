"""The LR schedule shapes against their definitions, WSD (warmup-stable-decay) included."""
import math

import pytest

from kiln.trainer.optim import lr_lambda


def test_warmup_then_cosine_and_linear():
    assert [lr_lambda(s, 4, 20, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(12, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(12, 4, 20, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_over_its_fraction():
    # 100 steps, warmup 10, decay over the last 20% of the 90 post-warmup steps = 18 steps (82..100)
    lr = [lr_lambda(s, 10, 100, "wsd", 0.1, 0.2) for s in range(101)]
    assert lr[9] == 1.0 and all(v == 1.0 for v in lr[10:83])
    assert lr[91] == pytest.approx(1 - 0.9 * 9 / 18) and lr[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[82:], lr[83:]))
    assert all(v == 1.0 for v in (lr_lambda(s, 10, 100, "wsd", 0.1, 0.0) for s in range(10, 101)))


def test_raising_steps_on_resume_warns_with_the_lr_jump():
    from kiln.trainer.config import Recipe, to_dict
    from kiln.trainer.optim import schedule_change

    r = Recipe()
    old = to_dict(r)
    old["train"]["steps"] = 300
    r.train.steps = 600
    line = schedule_change(old, r, 300)
    end = r.optim.min_lr_ratio  # the finished 300-step cosine run ended at min_lr_ratio
    now = lr_lambda(300, r.schedule.warmup_steps, 600, "cosine", r.optim.min_lr_ratio)
    assert line.startswith("kiln: warning: train.steps 300 -> 600") and f"{end:.3g}x to {now:.3g}x" in line
    r.train.steps = 300
    assert schedule_change(old, r, 300) is None
    r.train.steps, r.schedule.decay = 600, "constant"
    old["schedule"]["decay"] = "constant"
    assert schedule_change(old, r, 300) is None  # a constant LR does not move

