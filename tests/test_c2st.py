"""Tests of sbi_gen.c2st.

With ``n`` samples per set, the accuracy of a classifier on indistinguishable sets has a
standard error of about ``sqrt(0.25 / (2 n))`` = 0.008 for ``n = 2000``; the tolerance 0.03
is about 4 of those (plus room for the small downward bias of an over-fitting classifier).
For N(0, 1) against N(2, 1) the Bayes-optimal accuracy is Phi(1) = 0.841.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from sbi_gen.c2st import c2st

N = 2000


def test_same_distribution_is_near_one_half() -> None:
    rng = np.random.default_rng(0)
    accuracy = c2st(rng.normal(size=(N, 1)), rng.normal(size=(N, 1)))
    assert abs(accuracy - 0.5) < 0.03


def test_shifted_gaussians_reach_bayes_accuracy() -> None:
    rng = np.random.default_rng(1)
    accuracy = c2st(rng.normal(size=(N, 1)), rng.normal(loc=2.0, size=(N, 1)))
    assert abs(accuracy - norm.cdf(1.0)) < 0.03


def test_torch_and_numpy_inputs_agree_and_z_scoring_removes_units() -> None:
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=(300, 1)), rng.normal(loc=1.0, size=(300, 1))
    reference = c2st(p, q)
    assert 0.6 < reference < 0.8  # Phi(0.5) = 0.69
    assert c2st(torch.from_numpy(p[:, 0]), torch.from_numpy(q[:, 0])) == reference  # (N,) is one dimension
    assert abs(c2st(1000.0 * p + 5.0, 1000.0 * q + 5.0) - reference) < 0.02


def test_n_max_subsamples_both_sets_with_the_documented_rule() -> None:
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(1000, 1)), rng.normal(loc=1.0, size=(1000, 1))
    pick = np.random.default_rng(7)
    p_sub, q_sub = p[pick.choice(1000, 300, replace=False)], q[pick.choice(1000, 300, replace=False)]
    assert c2st(p, q, n_max=300, seed=7) == c2st(p_sub, q_sub, seed=7)
    # Sets of different sizes: each larger than n_max is subsampled, as the error message says.
    q_short = q[:700]
    pick = np.random.default_rng(7)
    p_sub, q_sub = p[pick.choice(1000, 300, replace=False)], q_short[pick.choice(700, 300, replace=False)]
    assert c2st(p, q_short, n_max=300, seed=7) == c2st(p_sub, q_sub, seed=7)
    assert c2st(p, q_short[:300], n_max=300, seed=7) == c2st(p_sub, q_short[:300], seed=7)
    with pytest.raises(ValueError, match="equal sample sizes"):
        c2st(p, q_short, n_max=800)


def test_bad_inputs_raise() -> None:
    rng = np.random.default_rng(4)
    p = rng.normal(size=(100, 2))
    with pytest.raises(ValueError, match="NaN"):
        c2st(p, np.where(np.arange(200).reshape(100, 2) == 7, np.nan, p))
    with pytest.raises(ValueError, match="equal sample sizes"):
        c2st(p, p[:50])
    with pytest.raises(ValueError, match="dimensions"):
        c2st(p, p[:, :1])
    with pytest.raises(ValueError, match="^c2st with 5 folds needs at least 5 samples of each set, got 4 and 4$"):
        c2st(p[:4], p[4:8])
    with pytest.raises(ValueError, match=r"must have shape \(N, d\) with N >= 2 and d >= 1, got \(100, 0\)"):
        c2st(p[:, :0], p[:, :0])
