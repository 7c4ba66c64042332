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
