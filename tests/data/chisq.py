"""Pearson's chi-square goodness-of-fit test without scipy (p-value from torch's gammaincc)."""

import numpy as np
import torch


def chisq_pvalue(observed, expected) -> float:
    """p-value of observed counts against expected counts (same total), df = categories - 1."""
    o, e = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    assert abs(o.sum() - e.sum()) < 1e-6 * e.sum() and np.all(e >= 5), (o, e)  # test's validity
    stat = float(((o - e) ** 2 / e).sum())
    df = len(o) - 1
    # chi2 survival function = regularized upper incomplete gamma Q(df/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
