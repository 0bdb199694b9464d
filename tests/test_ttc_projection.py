"""Projection of accuracy to the planned FLOPs: forms, the data's choice, honest intervals, and the
monitor's stop rule built on them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from grades.ttc import TTCMonitor
from grades.ttc.projection import (FORMS, accuracy_variance, nondecreasing, project_accuracy,
                                   project_checkpoints)
from grades.ttc.samples import samples_from_completions


def noisy_points(curve, xs, problems, n, rng):
    """Per checkpoint: accuracy and its variance from Bernoulli samples of per-problem rates."""
    offsets = np.linspace(-0.15, 0.15, problems)
    ys, vs = [], []
    for x in xs:
        p = np.clip(curve(x) + offsets, 0.01, 0.99)
        hits = rng.random((problems, n)) < p[:, None]
        ys.append(float(hits.mean()))
        vs.append(accuracy_variance(hits.tolist()))
    return ys, vs, float(np.mean(np.clip(curve(1.0) + offsets, 0.01, 0.99)))


def test_nondecreasing_filter_is_the_papers():
    assert nondecreasing([0.2, 0.5, 0.4, 0.5, 0.7, 0.6]).tolist() == [0, 1, 3, 4]
    assert nondecreasing([0.9]).tolist() == [0]


def test_accuracy_variance_is_the_binomial_one():
    # 2 problems, 4 samples: c = 1 and 4 -> unbiased p(1-p)/n estimates 1*3/(16*3) and 0
    assert accuracy_variance([[1, 0, 0, 0], [1, 1, 1, 1]]) == pytest.approx((1 * 3 / 48) / 4)
    # one sample per problem: y (1 - y) per problem / P^2
    assert accuracy_variance([[1], [0], [0], [1]]) == pytest.approx(0.5 * 0.5 / 4)
    # all correct is not certain: floored at (0.5 / N)^2
    assert accuracy_variance([[1, 1], [1, 1]]) == pytest.approx((0.5 / 4) ** 2)
    with pytest.raises(ValueError):
        accuracy_variance([])


def test_noise_free_saturated_curve_projects_tightly_far_out():
    # saturated by 10% of the plan; 5 checkpoints up to 25%: the interval is narrow at 100%
    xs = np.array([0.05, 0.1, 0.15, 0.2, 0.25])
    ys = 0.3 + 0.5 * (1 - np.exp(-xs / 0.02))
    pr = project_accuracy(xs * 1e18, ys, np.full(5, 2.5e-5), 1e18)  # s.d. 0.005: 500 problems x 16
    assert pr.ok and pr.form in FORMS and pr.n_points == 5
    assert pr.lower <= 0.8 <= pr.upper and pr.upper - 0.8 < 0.03
    assert 0 <= pr.gain <= pr.gain_upper < 0.03 and pr.last_accuracy == ys[-1]
    # power has 4 parameters: it needs 6 points (two residual degrees of freedom)
    assert set(pr.held_out_error) == set(FORMS) and pr.held_out_error["power"] is None
    assert not project_accuracy(xs[:4], ys[:4], np.full(4, 1e-4), 1.0).ok
    d = pr.to_dict()
    assert d["form"] == pr.form and d["upper"] == pr.upper


def test_still_rising_curve_keeps_a_wide_interval():
    xs = np.linspace(0.05, 0.4, 8)
    pr = project_accuracy(xs, 0.2 + 0.6 * xs, np.full(8, 1e-4), 1.0)
    assert pr.upper >= 0.75 and pr.upper - pr.lower > 0.05  # the linear trend says 0.8 at the plan
    assert pr.gain_upper >= 0.35  # 0.6 x 0.6 still to come


def test_the_data_choose_the_form():
    xs = np.linspace(0.02, 0.5, 10)
    power = 0.9 - 0.7 * (1 + xs / 0.01) ** -0.5
    exp = 0.8 - 0.6 * np.exp(-xs / 0.1)
    var = np.full(10, 1e-6)
    assert project_accuracy(xs, power, var, 1.0).form == "power"
    assert project_accuracy(xs, exp, var, 1.0).form in ("paper", "exp")
    # a dip that the paper's filter drops: its held-out error is lower than the raw exp fit's
    dip = exp.copy()
    dip[6] -= 0.05
    pr = project_accuracy(xs, dip, var, 1.0, forms=("paper", "exp"))
    assert pr.form == "paper" and pr.n_used == 9
    assert pr.held_out_error["paper"] < pr.held_out_error["exp"]
    assert project_accuracy(xs, exp, var, 1.0, forms=("power",)).form == "power"


def test_interval_covers_the_truth_at_its_confidence():
    """One-sided 95% upper bounds on noisy curves (200 problems, 4 samples): the final accuracy is
    below ``upper``, and the gain still to come below ``gain_upper``, in at least ~95% of runs, for
    a saturating and a still-rising curve."""
    rng = np.random.default_rng(0)
    xs = np.arange(1, 9) * 0.05
    for curve in (lambda x: 0.3 + 0.45 * (1 - np.exp(-x / 0.15)), lambda x: 0.3 + 0.45 * x):
        below = gain_below = 0
        for _ in range(60):
            ys, vs, true = noisy_points(curve, xs, 200, 4, rng)
            pr = project_accuracy(xs, ys, vs, 1.0)
            below += true <= pr.upper
            true_last = float(np.mean(np.clip(curve(xs[-1]) + np.linspace(-0.15, 0.15, 200), 0.01, 0.99)))
            gain_below += true - true_last <= pr.gain_upper
        assert below >= 54 and gain_below >= 54, (below, gain_below)  # 60 x 0.95 = 57; binomial slack


def test_too_few_points_and_bad_input():
    pr = project_accuracy([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [1e-3] * 4, 10.0)
    assert not pr.ok and "enough points" in pr.reason and pr.upper is None
    for kw, match in ((dict(train_flops=[2.0, 1.0, 3.0, 4.0]), "non-decreasing"),
                      (dict(accuracy=[0.1, 0.2, 1.3, 0.4]), r"\[0, 1\]"),
                      (dict(variance=[0.0] * 4), "variances"), (dict(planned_flops=0.0), "planned_flops"),
                      (dict(confidence=1.0), "confidence"), (dict(forms=("cubic",)), "forms"),
                      (dict(accuracy=[0.1, 0.2]), "one value per checkpoint")):
        args = dict(train_flops=[1.0, 2.0, 3.0, 4.0], accuracy=[0.1, 0.2, 0.3, 0.4], variance=[1e-3] * 4,
                    planned_flops=10.0)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            project_accuracy(**args)


def test_projection_is_reproducible_and_rounded():
    rng = np.random.default_rng(3)
    xs = np.arange(1, 7) * 0.1
    ys, vs, _ = noisy_points(lambda x: 0.4 + 0.4 * (1 - np.exp(-x / 0.2)), xs, 100, 4, rng)
    a, b = project_accuracy(xs, ys, vs, 1.0), project_accuracy(list(xs), list(ys), list(vs), 1.0)
    assert a.to_dict() == b.to_dict()
    assert a.upper == round(a.upper, 9) and a.point == round(a.point, 9)


def test_project_checkpoints_matches_project_accuracy():
    cks = [samples_from_completions(f"c{i}", 1e12 * (i + 1), [0, 1], [["a", "b"], ["a", "b"]],
                                    [[True, i > 0], [i > 1, i > 2]]) for i in range(4)]
    pr = project_checkpoints(cks, 1e13)
    ys = [math.fsum(sum(r) / len(r) for r in c.correct()) / 2 for c in cks]
    ref = project_accuracy([c.train_flops for c in cks], ys, [accuracy_variance(c.correct()) for c in cks], 1e13)
    assert pr.to_dict() == ref.to_dict()


# ---------------------------------------------------------------------------------------------
# the monitor's stop rule
# ---------------------------------------------------------------------------------------------
def rate_sample_fn(q, problems, n):
    good = int(round(q * n))
    return [["ok"] * good + [f"w{j}" for j in range(n - good)] for _ in problems]


def test_monitor_stops_early_on_a_saturated_curve():
    """The issue's case: noise-free accuracy saturated at 10% of the plan, checkpoints every 5%:
    the old range cut-off refused to project until ~50-60%; the interval allows a stop by 40%."""
    mon = TTCMonitor(list(range(20)), sample_fn=rate_sample_fn, verifier=lambda p, c: c == "ok",
                     n_samples=50, k_max=1, strategies=["pass"], target="projection", tolerance=0.02,
                     planned_train_flops=1e18, min_checkpoints=4)
    stop = None
    for i in range(1, 21):
        x = 0.05 * i
        d = mon.evaluate(0.3 + 0.5 * (1 - math.exp(-x / 0.02)), step=i, train_flops=x * 1e18)
        if d.stop:
            stop = x
            break
    assert stop is not None and stop <= 0.4, [d.reason for d in mon.decisions]
    pr = d.projection
    assert d.target == pytest.approx(pr.last_accuracy + pr.gain_upper) and pr.gain_upper <= 0.02
    assert "upper bound of the gain still projected" in d.reason


def test_monitor_does_not_stop_on_a_rising_curve():
    mon = TTCMonitor(list(range(20)), sample_fn=rate_sample_fn, verifier=lambda p, c: c == "ok",
                     n_samples=50, k_max=1, strategies=["pass"], target="projection", tolerance=0.02,
                     planned_train_flops=1e18, min_checkpoints=4)
    for i in range(1, 17):
        x = 0.05 * i
        d = mon.evaluate(0.2 + 0.6 * x, step=i, train_flops=x * 1e18)
        assert not d.stop, d.reason


def test_monitor_confidence_and_deprecated_max_extrapolation():
    kw = dict(sample_fn=rate_sample_fn, verifier=lambda p, c: c == "ok", n_samples=4,
              target="projection", planned_train_flops=1e15)
    with pytest.warns(FutureWarning, match="max_extrapolation is deprecated"):
        TTCMonitor([0], max_extrapolation=1.0, **kw)
    with pytest.raises(ValueError, match="max_extrapolation"):
        TTCMonitor([0], max_extrapolation=-1.0, **kw)
    for bad in (1.0, 0.3, True, "high"):
        with pytest.raises(ValueError, match="confidence"):
            TTCMonitor([0], confidence=bad, **kw)
    with pytest.raises(ValueError, match="fit_model"):
        TTCMonitor([0], fit_model="cubic", **kw)
    assert TTCMonitor([0], fit_model="paper", **kw).state_dict()["settings"]["confidence"] == 0.95
