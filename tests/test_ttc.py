"""grades.ttc: estimators vs brute force, fits, selection / break-even, FLOP counts, JSONL and CLI."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from grades.ttc import (CheckpointSamples, ExtrapolationError, FlopLedger, PoorFitError, Sample,
                        SamplesFormatError, best_of_k, break_even_queries, fit_accuracy_vs_flops,
                        fit_accuracy_vs_k, inference_flops_per_sample, inference_flops_per_token,
                        load_samples, majority_at_k, matrix_shapes, pass_at_k, samples_from_completions,
                        select, training_flops, write_samples)
from grades.ttc.cli import main as ttc_main


# ---------------------------------------------------------------------------------------------
# brute force references: enumerate every k-subset
# ---------------------------------------------------------------------------------------------
def brute_pass(correct, k):
    subs = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subs) / len(subs)


def brute_majority(answers, correct, k):
    corr = dict(zip(answers, correct))
    subs = list(itertools.combinations(range(len(answers)), k))
    tot = 0.0
    for s in subs:
        cnt: dict = {}
        for i in s:
            cnt[answers[i]] = cnt.get(answers[i], 0) + 1
        m = max(cnt.values())
        top = [a for a, v in cnt.items() if v == m]
        tot += sum(corr[a] for a in top) / len(top)
    return tot / len(subs)


def brute_best(scores, correct, k):
    subs = list(itertools.combinations(range(len(scores)), k))
    tot = 0.0
    for s in subs:
        m = max(scores[i] for i in s)
        top = [i for i in s if scores[i] == m]
        tot += sum(correct[i] for i in top) / len(top)
    return tot / len(subs)


def random_problem(rng, n):
    labels = rng.integers(0, rng.integers(1, 5), size=n)
    label_ok = rng.random(5) < 0.45
    answers = [f"a{x}" for x in labels]
    correct = [bool(label_ok[x]) for x in labels]
    scores = [float(x) for x in rng.integers(0, 4, size=n)]  # many ties on purpose
    return answers, correct, scores


@pytest.mark.parametrize("seed", range(6))
def test_estimators_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    probs = [random_problem(rng, int(rng.integers(1, 10))) for _ in range(4)]
    for ans, cor, sc in probs:  # every k = 1..n_p of each problem
        ks = list(range(1, len(ans) + 1))
        ep, em, eb = pass_at_k([cor], ks), majority_at_k([ans], [cor], ks), best_of_k([sc], [cor], ks)
        assert em.method == "exact"
        for i, k in enumerate(ks):
            assert abs(ep.per_problem[0, i] - brute_pass(cor, k)) < 1e-12
            assert abs(em.per_problem[0, i] - brute_majority(ans, cor, k)) < 1e-12
            assert abs(eb.per_problem[0, i] - brute_best(sc, cor, k)) < 1e-12
    # standard error over problems
    ks = list(range(1, min(len(p[0]) for p in probs) + 1))
    ans, cor, sc = ([p[i] for p in probs] for i in range(3))
    for e in (pass_at_k(cor, ks), majority_at_k(ans, cor, ks), best_of_k(sc, cor, ks)):
        np.testing.assert_allclose(e.mean, e.per_problem.mean(0))
        np.testing.assert_allclose(e.se, e.per_problem.std(0, ddof=1) / 2.0)


def exact_majority_3(sizes, good, k):
    """majority@k of three answer groups of ``sizes`` (``good``: indices of correct ones), with
    integers: sum over draws (x1, x2, x3) of C(m1,x1) C(m2,x2) C(m3,x3) x P(a good group wins)."""
    m1, m2, m3 = sizes
    num = 0  # in sixths: a w-of-t tie among the top counts pays 6 w / t
    for x1 in range(min(m1, k) + 1):
        for x2 in range(max(0, k - x1 - m3), min(m2, k - x1) + 1):
            xs = (x1, x2, k - x1 - x2)
            top = [i for i in range(3) if xs[i] == max(xs)]
            w = sum(i in good for i in top)
            num += math.comb(m1, x1) * math.comb(m2, x2) * math.comb(m3, xs[2]) * (6 * w // len(top))
    return Fraction(num, 6 * math.comb(sum(sizes), k))


def test_majority_large_n_three_groups_vs_exact_integers():
    groups = [((2100, 1900, 1000), {0}), ((1700, 1800, 1500), {0}), ((1500, 1500, 2000), {0, 1})]
    ans = [[g for g, m in enumerate(sz) for _ in range(m)] for sz, _ in groups]
    cor = [[g in good for g, m in enumerate(sz) for _ in range(m)] for sz, good in groups]
    ks = [1, 2, 3, 10, 51, 200]
    e = majority_at_k(ans, cor, ks)
    assert e.method == "exact"
    # binomials go through log-gamma: gammaln(5001) ~ 3.8e4 carries ~1e-11 relative rounding
    for p, (sz, good) in enumerate(groups):
        for i, k in enumerate(ks):
            assert abs(e.per_problem[p, i] - float(exact_majority_3(sz, good, k))) < 1e-10, (p, k)


def test_out_of_range_probabilities_raise_instead_of_being_clipped(monkeypatch):
    from grades.ttc import estimators
    log_comb = estimators._log_comb
    # a wrong coefficient (every binomial e^0.5 too large) gives majority@k = e^0.5 > 1
    monkeypatch.setattr(estimators, "_log_comb", lambda n, k: log_comb(n, k) + 0.5)
    with pytest.raises(FloatingPointError, match="outside"):
        majority_at_k([["x"] * 6], [[True] * 6], [1, 3])
    # a wrong probability of holding the maximum (3x too large) gives best-of-k > 1
    probs = estimators._max_group_probs
    monkeypatch.setattr(estimators, "_max_group_probs", lambda *a: 3.0 * probs(*a))
    with pytest.raises(FloatingPointError, match="outside"):
        best_of_k([list(range(8))], [[False] * 7 + [True]], [2, 5])


def test_best_of_k_exact_for_large_n():
    # one correct sample at ranks n - 4 and n / 2 + 1 of n = 1e6 distinct scores:
    # best-of-k = sum over them of C(r - 1, k - 1) / C(n, k), in exact rational arithmetic
    n = 1_000_000
    correct = np.zeros(n, dtype=bool)
    correct[[n - 5, n // 2]] = True
    ks = [1, 2, 7, 64]
    est = best_of_k([np.arange(n, dtype=np.float64)], [correct], ks)
    for k, got in zip(ks, est.mean):
        exact = sum(Fraction(math.comb(r - 1, k - 1), math.comb(n, k)) for r in (n - 4, n // 2 + 1))
        assert got == pytest.approx(float(exact), rel=1e-12)


def test_k_must_be_whole():
    cor = [[True, False, False]]
    with pytest.raises(ValueError, match="whole"):
        pass_at_k(cor, [2.9])
    with pytest.raises(ValueError, match="whole"):
        majority_at_k([["a", "b", "c"]], cor, 1.5)
    with pytest.raises(TypeError):
        best_of_k([[0.0, 1.0, 2.0]], cor, "2")
    with pytest.raises(TypeError):
        pass_at_k(cor, [1, None])
    assert pass_at_k(cor, [2.0]).ks.tolist() == [2]
    assert pass_at_k(cor, np.array(3)).mean[0] == 1.0


def test_majority_all_k_for_larger_n_vs_brute_force():
    rng = np.random.default_rng(7)
    labels = rng.choice(4, size=12, p=[0.4, 0.3, 0.2, 0.1])
    ans = [str(x) for x in labels]
    cor = [x == 1 for x in labels]
    e = majority_at_k([ans], [cor], range(1, 13))
    for k in (1, 2, 3, 5, 8, 12):
        assert abs(e.at(k)[0] - brute_majority(ans, cor, k)) < 1e-12


def test_hand_values_and_tie_rule():
    # one correct answer "a" among distinct wrong answers: every subset is a tie between singletons
    e = majority_at_k([["a", "w1", "w2", "w3"]], [[True, False, False, False]], [1, 2, 3, 4])
    np.testing.assert_allclose(e.mean, [0.25] * 4, atol=1e-15)
    # [a, a, w1, w2]: k=2 -> (1 + 4 * 1/2 + 0) / 6 = 1/2; k=3 -> (2 + 2 * 1/3) / 4 = 2/3; k=4 -> 1
    e = majority_at_k([["a", "a", "w1", "w2"]], [[True, True, False, False]], [2, 3, 4])
    np.testing.assert_allclose(e.mean, [0.5, 2 / 3, 1.0], atol=1e-15)
    # best-of-k with a full tie is the mean correctness for every k
    e = best_of_k([[1.0] * 4], [[True, False, False, False]], [1, 2, 4])
    np.testing.assert_allclose(e.mean, [0.25] * 3, atol=1e-15)
    # without ties: best-of-n picks the top-scored sample
    e = best_of_k([[0.1, 0.9, 0.5]], [[False, True, False]], [3])
    assert e.mean[0] == pytest.approx(1.0)


def test_edges_c0_cn_kn_and_k_gt_n():
    cor0, corn = [[False] * 6], [[True] * 6]
    for est in (pass_at_k(cor0, range(1, 7)), majority_at_k([["x"] * 6], cor0, range(1, 7)),
                best_of_k([list(range(6))], cor0, range(1, 7))):
        assert np.all(est.mean == 0.0)
    for est in (pass_at_k(corn, range(1, 7)), majority_at_k([["x"] * 6], corn, range(1, 7)),
                best_of_k([list(range(6))], corn, range(1, 7))):
        np.testing.assert_allclose(est.mean, 1.0, atol=1e-15)
    assert pass_at_k([[True, False, False]], 3).mean[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exceeds"):
        pass_at_k([[True, False]], 3)
    with pytest.raises(ValueError, match="exceeds"):
        majority_at_k([["a", "b"]], [[True, False]], [1, 3])
    with pytest.raises(ValueError, match="exceeds"):
        best_of_k([[0.0, 1.0]], [[True, False]], 3)
    with pytest.raises(ValueError):
        pass_at_k([[True]], 0)
    with pytest.raises(TypeError):
        pass_at_k([[True]], True)
    with pytest.raises(ValueError, match="both correct and incorrect"):
        majority_at_k([["a", "a"]], [[True, False]], 1)
    with pytest.raises(ValueError, match="finite"):
        best_of_k([[float("nan"), 1.0]], [[True, False]], 1)
    assert math.isnan(pass_at_k([[True, False]], 1).se[0])  # one problem: no standard error


def test_large_n_no_overflow():
    n = 5000
    rng = np.random.default_rng(0)
    cor = [rng.random(n) < 0.002, np.zeros(n, bool), rng.random(n) < 0.3]
    ks = [1, 2, 50, 1000, 4999, 5000]
    e = pass_at_k(cor, ks)
    assert np.isfinite(e.per_problem).all()
    c = int(cor[0].sum())
    # closed form with exact integers for comparison
    for i, k in enumerate(ks):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert abs(e.per_problem[0, i] - exact) < 1e-10
    assert e.per_problem[1].max() == 0.0 and e.per_problem[2, -1] == 1.0
    # best-of-k at n = 5000 against the rank formula in integers: sum_r y_r C(r-1, k-1) / C(n, k)
    scores = rng.random(n)
    bcor = rng.random(n) < 0.1
    y = bcor[np.argsort(scores)]
    ks = [1, 2, 100, 4000, 5000]
    b = best_of_k([scores.tolist()], [bcor.tolist()], ks)
    for i, k in enumerate(ks):
        exact = Fraction(sum(math.comb(r - 1, k - 1) for r in range(1, n + 1) if y[r - 1]), math.comb(n, k))
        assert abs(b.per_problem[0, i] - float(exact)) < 1e-10, k


def test_majority_monte_carlo_within_stated_bound():
    rng = np.random.default_rng(3)
    ans, cor = [], []
    for _ in range(8):
        lab = rng.choice(3, size=14, p=[0.45, 0.35, 0.2])
        ans.append([str(x) for x in lab])
        cor.append([x == 0 for x in lab])
    exact = majority_at_k(ans, cor, range(1, 15))
    mc = majority_at_k(ans, cor, range(1, 15), method="monte-carlo", mc_draws=1500, mc_delta=0.001, seed=1)
    assert mc.method == "monte-carlo"
    # Hoeffding at each of the 14 k with a union bound: simultaneous over k with prob. 1 - delta
    assert mc.mc_error_bound == pytest.approx(math.sqrt(math.log(2 * 14 / 0.001) / (2 * 1500 * 8)))
    assert np.abs(mc.mean - exact.mean).max() <= mc.mc_error_bound


def test_majority_switches_to_monte_carlo_where_exact_would_overflow():
    sizes, ks = (400, 350, 250), [1, 3, 25, 990]  # k_max = 990 of n = 1000 overflows the recursion
    ans = [[g for g, m in enumerate(sizes) for _ in range(m)]]
    cor = [[g == 0 for g, m in enumerate(sizes) for _ in range(m)]]
    with pytest.raises(ValueError, match="overflow"):
        majority_at_k(ans, cor, ks, method="exact")
    mc = majority_at_k(ans, cor, ks, mc_draws=60, seed=0)
    assert mc.method == "monte-carlo"
    exact = np.array([float(exact_majority_3(sizes, {0}, k)) for k in ks])
    assert np.abs(mc.mean - exact).max() <= mc.mc_error_bound
    assert mc.mean[-1] == exact[-1] == 1.0  # 990 of 1000 drawn: the 400 always win


# ---------------------------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------------------------
def test_fit_vs_k_recovers_parameters():
    rng = np.random.default_rng(0)
    ks = np.arange(1, 33)
    truth = 0.8 - (0.8 - 0.3) * np.exp(-0.25 * (ks - 1))
    acc = np.clip(truth + rng.normal(0, 0.005, ks.size), 0, 1)
    fit = fit_accuracy_vs_k(ks, acc)
    assert fit.ok, fit.reason
    d = json.loads(json.dumps(fit.to_dict()))  # residuals reported, JSON-ready
    np.testing.assert_allclose(d["residuals"], acc - fit.predict(ks), atol=1e-15)
    assert math.sqrt(np.mean(np.square(d["residuals"]))) == pytest.approx(d["rmse"])
    assert fit.params["a_1"] == pytest.approx(0.3, abs=0.02)
    assert fit.params["a_inf"] == pytest.approx(0.8, abs=0.02)
    assert fit.params["b"] == pytest.approx(0.25, rel=0.15)
    assert fit.rmse < 0.01 and fit.r2 > 0.99
    assert fit.predict(40) == pytest.approx(0.8, abs=0.02)
    with pytest.raises(ExtrapolationError):
        fit.predict(100)


def test_fit_vs_flops_recovers_and_refuses():
    rng = np.random.default_rng(1)
    f = np.linspace(0, 2e18, 9)
    truth = 0.7 - (0.7 - 0.1) * np.exp(-f / 5e17)
    fit = fit_accuracy_vs_flops(f, truth + rng.normal(0, 0.004, f.size))
    assert fit.ok, fit.reason
    assert fit.params["a_max"] == pytest.approx(0.7, abs=0.03)
    assert fit.params["a_0"] == pytest.approx(0.1, abs=0.03)
    assert fit.params["f_s"] == pytest.approx(5e17, rel=0.2)
    assert fit.predict(2.5e18) == pytest.approx(0.7 - 0.6 * math.exp(-5), abs=0.02)
    with pytest.raises(ExtrapolationError):
        fit.predict(4e18)
    pw = fit_accuracy_vs_flops(f, truth, model="power")
    assert pw.ok and pw.rmse < 0.02
    # zig-zag data: flagged and refused
    bad = fit_accuracy_vs_flops(f, [0.1, 0.6, 0.1, 0.6, 0.1, 0.6, 0.1, 0.6, 0.1])
    assert not bad.ok and "R^2" in bad.reason
    with pytest.raises(PoorFitError):
        bad.predict(1e18)
    # too few points for three parameters
    few = fit_accuracy_vs_flops([0, 1e18, 2e18], [0.1, 0.5, 0.6])
    assert not few.ok and "distinct" in few.reason
    with pytest.raises(ValueError):
        fit_accuracy_vs_flops([0, 1], [0.1, 1.5])


# ---------------------------------------------------------------------------------------------
# selection and break-even (hand-computed)
# ---------------------------------------------------------------------------------------------
def hand_checkpoints():
    """4 problems x 4 samples. A: 1 correct of 4, B: 2 of 4, C: 3 of 4 (final)."""
    def ck(name, flops, n_correct):
        pats = {1: (["a", "w1", "w2", "w3"], [True, False, False, False]),
                2: (["a", "a", "w1", "w2"], [True, True, False, False]),
                3: (["a", "a", "a", "w1"], [True, True, True, False])}[n_correct]
        return samples_from_completions(name, flops, [0, 1, 2, 3], [pats[0]] * 4, [pats[1]] * 4)
    return [ck("A", 1e12, 1), ck("B", 2e12, 2), ck("C", 4e12, 3)]


def test_select_hand_example():
    sel = select(hand_checkpoints(), k_max=4, strategies=["pass@k"], queries=1500, infer_flops_per_sample=1e9)
    assert sel.target == pytest.approx(0.75) and sel.reference == "C"
    # pass@3 of A = 1 - C(3,3)/C(4,3) = 0.75 meets 0.75 with the fewest training FLOPs
    a = sel.min_train
    assert (a.checkpoint, a.k, a.strategy) == ("A", 3, "pass@k")
    assert a.train_flops_saved == pytest.approx(3e12)
    assert a.break_even == pytest.approx(3e12 / (2 * 1e9))
    # totals at Q=1500: A,k=3: 1e12+4.5e12; B,k=2 (pass 5/6): 2e12+3e12; C,k=1: 4e12+1.5e12
    t = sel.min_total
    assert (t.checkpoint, t.k) == ("B", 2) and t.total_flops == pytest.approx(5e12)
    assert t.break_even == pytest.approx(2000.0)
    assert sel.reference_total_flops == pytest.approx(5.5e12)


def test_select_majority_tolerance_and_target():
    cks = hand_checkpoints()
    # majority@k of B: k=2 0.5, k=3 2/3, k=4 1.0 (hand values); of A: 0.25 for every k
    sel = select(cks, k_max=4, strategies=["majority"], target=0.75)
    assert (sel.min_train.checkpoint, sel.min_train.k) == ("B", 4)
    sel = select(cks, k_max=4, strategies=["majority"], target=0.75, tolerance=0.1)
    assert (sel.min_train.checkpoint, sel.min_train.k) == ("B", 3)
    assert sel.min_train.accuracy == pytest.approx(2 / 3)
    sel = select(cks, k_max=2, strategies=["majority"], target=0.99)
    assert sel.min_train is None
    # best-of-k is dropped by default without scores, refused when asked for
    assert "best-of-k" not in select(cks, k_max=2).strategies
    with pytest.raises(ValueError, match="score"):
        select(cks, k_max=2, strategies=["best-of-k"])
    with pytest.raises(ValueError, match="fewer than k_max"):
        select(cks, k_max=5)
    with pytest.raises(ValueError, match="infer_flops_per_sample"):
        select(cks, k_max=2, queries=10)
    # the full run cannot cost less than its last checkpoint (C: 4e12): negative savings refused
    with pytest.raises(ValueError, match="below the training FLOPs"):
        select(cks, k_max=2, final_train_flops=3e12)
    assert select(cks, k_max=2, final_train_flops=4e12).reference_flops == 4e12


def test_break_even_queries():
    assert break_even_queries(3e12, 3, 1e9) == pytest.approx(1500.0)
    assert break_even_queries(3e12, 1, 1e9) == math.inf
    assert break_even_queries(-1.0, 2, 1e9) == 0.0
    assert break_even_queries(1e12, 4, 1e9, k_ref=2) == pytest.approx(500.0)
    assert break_even_queries(1e12, 4, None) is None
    with pytest.raises(ValueError):
        break_even_queries(1.0, 2, 0.0)


def test_select_projection_target():
    # accuracies on an exact saturating curve: the projection brackets the curve's value at the
    # full run's FLOPs, and the target is its upper bound
    f = np.linspace(0, 1e15, 6)
    acc = 0.8 - 0.7 * np.exp(-f / 3e14)
    cks = []
    for i, (x, a) in enumerate(zip(f, acc)):
        ncor = int(round(a * 400))  # 400 problems, one sample each, the first ncor correct
        cks.append(samples_from_completions(f"c{i}", x, list(range(400)), [["x"]] * 400,
                                            [[j < ncor] for j in range(400)]))
    sel = select(cks, k_max=1, target="projection", strategies=["pass"])
    pr = sel.projection
    assert pr is not None and pr.ok and sel.target == pr.upper and sel.target_source == "projection"
    assert pr.lower <= acc[-1] <= pr.upper and pr.upper - pr.lower < 0.1
    assert set(pr.held_out_error) == {"paper", "exp", "power"} and pr.form in pr.held_out_error
    # farther out the interval widens, but a projection is still made (no range cut-off)
    far = select(cks, k_max=1, target="projection", final_train_flops=5e15).projection
    assert far.ok and far.lower <= 0.8 - 0.7 * math.exp(-50 / 3) <= far.upper
    with pytest.warns(FutureWarning, match="max_extrapolation"):
        select(cks, k_max=1, target="projection", max_extrapolation=0.5)
    with pytest.raises(ValueError, match="cannot project"):
        select(cks[:3], k_max=1, target="projection")
    with pytest.raises(ValueError, match="fit_model"):
        select(cks, k_max=1, target="projection", fit_model="cubic")


def test_select_accounts_for_the_monte_carlo_bound(monkeypatch):
    import importlib
    select_module = importlib.import_module("grades.ttc.select")  # the package re-exports select()
    answers = [[str(i % 3) for i in range(60)]]
    correct = [[a == "0" for a in answers[0]]]
    ck = samples_from_completions("c", 1.0, [0], answers, correct)
    exact = select([ck], k_max=1, target="final", strategies=["majority"])
    assert exact.table[0].mc_error_bound == 0.0 and exact.table[0].meets
    orig = select_module.majority_at_k
    # the Monte Carlo path (taken by "auto" only for k_max in the hundreds), forced here
    monkeypatch.setattr(select_module, "majority_at_k",
                        lambda a, c, ks: orig(a, c, ks, method="monte-carlo", mc_draws=50))
    mc = select([ck], k_max=1, target=0.3, strategies=["majority"])
    cand = mc.table[0]
    assert cand.mc_error_bound > 0.2  # sqrt(log(2 / 0.01) / 100)
    assert abs(cand.accuracy - 1 / 3) < 0.2 and not cand.meets and mc.min_train is None
    assert select([ck], k_max=1, target=0.05, strategies=["majority"]).table[0].meets


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def test_flops_hand_count_llama():
    from grades.demo.models import llama_config, tiny_llama
    cfg = llama_config(vocab_size=15, size="tiny")  # hidden 64, 2 layers, 4 heads (dim 16), 2 kv, MLP 128
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (128 * 64)  # q, k+v, o, gate+up+down
    n = 2 * per_layer + 15 * 64  # + LM head; embeddings excluded
    assert n == 74688
    shapes = matrix_shapes(cfg)
    assert sum(o * i for o, i in shapes.values()) == n
    # the model's own Linear weights are exactly these matrices
    model = tiny_llama(15, "tiny")
    lin = {name: m.weight.shape for name, m in model.named_modules() if m.__class__.__name__ == "Linear"}
    assert {k: tuple(v) for k, v in lin.items()} == shapes
    tokens, T = 1000, 8
    attn = 3 * 4 * 2 * 4 * 16 * (T + 1) / 2  # fwd+bwd, QK and AV, 2 layers, 4 heads x 16, mean ctx 4.5
    assert training_flops(cfg, tokens) == 6 * n * tokens
    assert training_flops(cfg, tokens, seq_len=T) == pytest.approx((6 * n + attn) * tokens)
    frozen = ["model.layers.0.self_attn.q_proj.weight", "base_model.model.model.layers.1.mlp.down_proj"]
    assert training_flops(cfg, tokens, frozen=frozen) == (6 * n - 2 * (4096 + 8192)) * tokens
    assert inference_flops_per_token(cfg, 10) == 2 * n + 4 * 2 * 4 * 16 * 10
    with pytest.raises(ValueError, match="unknown matrix"):
        training_flops(cfg, 1, frozen=["model.layers.9.mlp.up_proj"])
    with pytest.raises(ValueError):
        training_flops(cfg, -1)


def test_inference_flops_per_sample_hand_count():
    from grades.demo.models import llama_config
    cfg = llama_config(vocab_size=15, size="tiny")
    body, head, att = 73728, 15 * 64, 4 * 2 * 4 * 16  # matrices without the LM head; QK+AV per ctx
    # 5 prompt tokens, 3 new: the prefill's last position gives token 1 (LM head there only),
    # then 2 decoding steps feed tokens 1 and 2 with 6 and 7 positions in the KV cache
    want = 2 * body * (5 + 2) + 2 * head * 3 + att * (5 * 6 / 2 + 6 + 7)
    assert inference_flops_per_sample(cfg, 5, 3) == want == 1052288
    assert inference_flops_per_sample(cfg, 5, 1) == 2 * body * 5 + 2 * head + att * 15
    with pytest.raises(ValueError, match="new_tokens"):
        inference_flops_per_sample(cfg, 5, 0)
    with pytest.raises(TypeError, match="prompt_len"):
        inference_flops_per_sample(cfg, 5.5, 2)


def test_inference_flops_per_sample_matches_generate():
    """FLOPs that torch counts while ``generate()`` samples, minus what the eager attention spends
    on the masked half of the prefill's square (the count is causal), equal the formula."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from grades.demo.models import tiny_llama
    from grades.demo.tasks import AdditionTask
    task = AdditionTask(digits=1, seed=0, n_val=4, n_test=4)
    model = tiny_llama(task.vocab_size, "tiny", seed=0).eval()
    batch = task.prompt_batch(task.val[:2])
    p, att = batch["input_ids"].shape[1], 4 * 2 * 4 * 16
    assert model.config._attn_implementation == "eager"  # bmm's over the full (masked) square
    for new in (1, 4):
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                                 num_return_sequences=3, pad_token_id=task.pad_id, eos_token_id=task.eos_id)
        assert out.shape == (6, p + new)
        masked = att * (p * p - p * (p + 1) / 2)
        assert fc.get_total_flops() / 6 - masked == inference_flops_per_sample(model.config, p, new)


def test_flop_ledger_adds_up():
    from grades.demo.models import llama_config
    cfg = llama_config(vocab_size=15, size="tiny")
    led = FlopLedger(cfg, seq_len=8)
    led.add_step(512)
    led.add_step(512, frozen=["model.layers.0.mlp.gate_proj"])
    s = led.summary(planned_tokens=512 * 10)
    assert s["grades_saved"] == pytest.approx(2 * 8192 * 512)
    assert s["early_stop_saved"] == pytest.approx(8 * training_flops(cfg, 512, seq_len=8))
    assert s["total_saved"] == pytest.approx(s["grades_saved"] + s["early_stop_saved"])
    assert led.steps == 2 and led.history[-1] == (2, led.train_flops)


# ---------------------------------------------------------------------------------------------
# JSONL and CLI
# ---------------------------------------------------------------------------------------------
def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_write_load_roundtrip(tmp_path):
    cks = hand_checkpoints()
    cks[0].problems[0][0] = Sample("a", True, 0.5)
    p = tmp_path / "s.jsonl"
    assert write_samples(p, cks) == 12
    back = load_samples(p)
    assert [c.name for c in back] == ["A", "B", "C"]
    assert back[0].problems[0][0] == Sample("a", True, 0.5)
    assert back[1].correct() == cks[1].correct()
    with pytest.raises(TypeError):
        write_samples(p, [{"checkpoint": "x"}])
    with pytest.raises(ValueError):
        CheckpointSamples("x", -1.0)


def _line(ck, flops, prob, pattern):
    return json.dumps({"checkpoint": ck, "train_flops": flops, "problem": prob,
                       "samples": [{"answer": a, "correct": c} for a, c in pattern]})


def small_jsonl(tmp_path, extra=()):
    good = [("7", True), ("7", True), ("3", False), ("5", False)]
    poor = [("7", True), ("3", False), ("5", False), ("6", False)]
    lines = []
    for prob in range(5):
        lines.append(_line("early", 1e12, prob, poor))
        lines.append(_line("late", 4e12, prob, good))
    lines[2:2] = list(extra)
    return write_lines(tmp_path / "s.jsonl", lines)


def test_load_samples_refuses_bad_argument_types(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"checkpoint": "c", "train_flops": 1, "problem": 0, "samples": [{"answer": "1", "correct": true}]}\n')
    with pytest.raises(TypeError, match="report must be a LoadReport"):
        load_samples(p, report="x")
    for fd in (3, True):  # an int would be opened as a file descriptor
        with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
            load_samples(fd)
    assert load_samples(str(p))[0].name == "c"


def test_load_bad_lines_skip_or_error(tmp_path):
    p = small_jsonl(tmp_path, ['{"checkpoint": "early", "train_flops": 1e12, "problem": 9, "samples": [}',
                               _line("early", 1e12, 10, [])])
    from grades.ttc.samples import LoadReport
    rep = LoadReport()
    cks = load_samples(p, report=rep)
    assert [ln for ln, _ in rep.bad_lines] == [3, 4]
    assert "invalid JSON" in rep.bad_lines[0][1] and "non-empty" in rep.bad_lines[1][1]
    assert len(cks[0].problems) == 5
    with pytest.raises(SamplesFormatError, match="line 3"):
        load_samples(p, on_bad_line="error")
    neg = small_jsonl(tmp_path, [_line("neg", -5.0, 0, [("1", True)])])
    with pytest.raises(SamplesFormatError, match="line 3: train_flops"):
        load_samples(neg)
    dup = small_jsonl(tmp_path, [_line("early", 1e12, 0, [("1", True)])])
    with pytest.raises(SamplesFormatError, match="repeated"):
        load_samples(dup, on_bad_line="error")
    only_bad = write_lines(tmp_path / "bad.jsonl", ["not json", "[1, 2]"])
    with pytest.raises(SamplesFormatError, match="no valid lines"):
        load_samples(only_bad)


def test_load_reports_undecodable_huge_and_nested_lines(tmp_path):
    from grades.ttc.samples import LoadReport
    good = small_jsonl(tmp_path).read_bytes().splitlines()
    huge_score = _line("early", 1e12, 20, [("7", True)]).replace('true', 'true, "score": 1' + "0" * 400)
    lines = [good[0], b'{"checkpoint": "early", "train_flops": 1e12, "problem": "\xff\xfe", "samples": []}',
             huge_score.encode(), b"[" * 100000, *good[1:]]
    p = tmp_path / "odd.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a byte-order mark
    rep = LoadReport()
    cks = load_samples(p, report=rep)
    assert [ln for ln, _ in rep.bad_lines] == [2, 3, 4]
    assert "not valid UTF-8 (byte 0xff" in rep.bad_lines[0][1]
    assert "score must be a finite number" in rep.bad_lines[1][1]
    assert "invalid JSON" in rep.bad_lines[2][1]
    assert [c.name for c in cks] == ["early", "late"] and len(cks[0].problems) == 5
    with pytest.raises(SamplesFormatError, match="line 2: not valid UTF-8"):
        load_samples(p, on_bad_line="error")
    # a train_flops integer too large for a float is not finite: refused like inf
    big = small_jsonl(tmp_path, [_line("early", 1e12, 9, [("1", True)]).replace("1000000000000.0", "1" + "0" * 400)])
    with pytest.raises(SamplesFormatError, match="line 3: train_flops must be finite"):
        load_samples(big)
    with pytest.raises(ValueError, match="finite"):
        CheckpointSamples("x", 10 ** 400)


def test_load_refuses_one_answer_with_two_verdicts(tmp_path):
    from grades.ttc.samples import LoadReport
    p = small_jsonl(tmp_path, [_line("early", 1e12, 7, [("7", True), ("8", False), ("7", False)])])
    rep = LoadReport()
    cks = load_samples(p, report=rep)
    assert rep.bad_lines == [(3, "answer '7' is marked both correct and incorrect (samples[2]); "
                                 "one answer needs one verdict")]
    assert 7 not in cks[0].problems
    with pytest.raises(SamplesFormatError, match="line 3: answer '7' is marked both"):
        load_samples(p, on_bad_line="error")
    with pytest.raises(ValueError, match="checkpoint 'c', problem 'q': answer 'x'"):
        samples_from_completions("c", 1.0, ["q"], [["x", "x"]], [[True, False]])


def test_load_refuses_to_drop_a_whole_checkpoint(tmp_path):
    from grades.ttc.samples import LoadReport
    # every line of "final" is malformed: skipping them would silently make "late" the reference
    bad = [json.dumps({"checkpoint": "final", "train_flops": 9e12, "problem": p, "samples": "none"})
           for p in range(3)]
    p = small_jsonl(tmp_path, bad)
    rep = LoadReport()
    with pytest.raises(SamplesFormatError, match=r"checkpoint 'final' appears only on malformed lines "
                                                 r"\(lines 3, 4, 5; line 3: 'samples' must be"):
        load_samples(p, report=rep)
    assert rep.bad_checkpoints == {"final": [3, 4, 5]}
    # one bad line of a checkpoint that has good ones is only skipped (that problem is dropped)
    rep = LoadReport()
    assert len(load_samples(small_jsonl(tmp_path, bad[:1] + [_line("final", 9e12, 0, [("7", True)])]),
                            report=rep)) == 3
    assert rep.bad_checkpoints == {"final": [3]}


def test_cli_end_to_end(tmp_path, capsys):
    p = small_jsonl(tmp_path, ["{oops"])
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = ttc_main([str(p), "--k-max", "4", "--queries", "100", "--infer-flops", "1e9",
                     "--json", str(out_json), "--plot", str(out_png)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "skipped 1 malformed line(s)" in cap.err and "line 3" in cap.err
    assert "fewest training FLOPs: early with pass@k, k=2" in cap.out
    assert "oracle verifier" in cap.out
    res = json.loads(out_json.read_text())
    # early: 1 correct of 4 -> pass@2 = 0.5 = late's pass@1 (2 of 4)
    assert res["min_train"]["checkpoint"] == "early" and res["min_train"]["k"] == 2
    assert res["min_train"]["break_even"] == pytest.approx(3e12 / 1e9)
    assert res["skipped_lines"][0]["line"] == 3
    kf = res["k_fits"]["early"]["pass@k"]
    assert kf["model"] == "k-exp" and set(kf["params"]) == {"a_1", "a_inf", "b"}
    assert len(kf["residuals"]) == 4
    # early pass@k = k/4 is a line: the saturating fit fails its checks and extrapolates nothing;
    # late (1/2, 5/6, 1, 1) fits and extrapolates to k = 5 (k_max + half the fitted range) only
    assert not kf["ok"] and kf["extrapolated"] == []
    late = res["k_fits"]["late"]["pass@k"]
    assert late["ok"] and [e["k"] for e in late["extrapolated"]] == [5]
    assert late["extrapolated"][0]["accuracy"] == pytest.approx(1.0, abs=0.01)
    assert out_png.stat().st_size > 1000
    # refuse malformed lines
    assert ttc_main([str(p), "--on-bad-line", "error"]) == 2
    assert "line 3" in capsys.readouterr().err
    # n < k
    assert ttc_main([str(small_jsonl(tmp_path)), "--k-max", "5"]) == 2
    assert "fewer than k_max=5" in capsys.readouterr().err
    # negative FLOPs
    assert ttc_main([str(small_jsonl(tmp_path, [_line("x", -1, 0, [("1", True)])]))]) == 2
    assert "train_flops must be finite and >= 0" in capsys.readouterr().err
    # empty file / missing file / unreachable target
    empty = write_lines(tmp_path / "e.jsonl", [""])
    assert ttc_main([str(empty)]) == 2
    assert ttc_main([str(tmp_path / "missing.jsonl")]) == 2
    assert ttc_main([str(small_jsonl(tmp_path)), "--target", "0.99", "--k-max", "2",
                     "--strategies", "majority"]) == 1
    assert ttc_main([str(small_jsonl(tmp_path)), "--target", "high"]) == 2
    capsys.readouterr()
    # a directory, a non-UTF-8 line, a 400-digit train_flops, an output that cannot be written
    assert ttc_main([str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = small_jsonl(tmp_path)
    bad.write_bytes(bad.read_bytes() + b'{"checkpoint": "early", "note": "\xe9"}\n')
    assert ttc_main([str(bad)]) == 0
    assert "line 11: not valid UTF-8 (byte 0xe9" in capsys.readouterr().err
    huge = _line("x", 1, 0, [("1", True)]).replace('"train_flops": 1', '"train_flops": 1' + "0" * 400)
    big = small_jsonl(tmp_path, [huge])
    assert ttc_main([str(big)]) == 2
    assert "line 3: train_flops must be finite and >= 0, got 100000" in capsys.readouterr().err
    assert ttc_main([str(small_jsonl(tmp_path)), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
    # the full run below the last checkpoint's FLOPs
    assert ttc_main([str(small_jsonl(tmp_path)), "--final-flops", "1e12"]) == 2
    assert "below the training FLOPs" in capsys.readouterr().err
    # a checkpoint that appears only on malformed lines is not dropped silently
    lost = small_jsonl(tmp_path, ['{"checkpoint": "final", "train_flops": 9e12, "problem": 0}'])
    assert ttc_main([str(lost)]) == 2
    err = capsys.readouterr().err
    assert "line 3: missing field 'samples'" in err and "checkpoint 'final' appears only on malformed" in err


def test_cli_projection_target(tmp_path, capsys):
    f = np.linspace(0, 1e15, 6)
    acc = 0.8 - 0.7 * np.exp(-f / 3e14)
    cks = [samples_from_completions(f"c{i}", x, list(range(200)), [["7", "7"]] * 200,
                                    [[j < round(a * 200)] * 2 for j in range(200)])
           for i, (x, a) in enumerate(zip(f, acc))]
    p = tmp_path / "curve.jsonl"
    write_samples(p, cks)
    out = tmp_path / "r.json"
    code = ttc_main([str(p), "--target", "projection", "--final-flops", "1.4e15", "--tolerance", "0.06",
                     "--strategies", "pass", "--json", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "projection (" in cap.out and "held-out error by form" in cap.out and "(projection)" in cap.out
    res = json.loads(out.read_text())
    pr = res["projection"]
    assert res["target_source"] == "projection" and res["reference_flops"] == 1.4e15
    # (the points are rounded to 1/200: the bounds hold the curve up to that)
    assert pr["lower"] - 0.005 <= 0.8 - 0.7 * math.exp(-1.4e15 / 3e14) <= pr["upper"] + 0.005
    assert pr["upper"] == res["target"]
    assert pr["n_points"] == 6 and pr["form"] in pr["held_out_error"]
    # the first checkpoint within the tolerance of the upper bound is chosen
    first = next(i for i, a in enumerate(acc) if round(a * 200) / 200 >= res["threshold"] - 1e-12)
    assert res["min_train"]["checkpoint"] == f"c{first}"
    assert res["min_train"]["train_flops_saved"] == pytest.approx(1.4e15 - f[first])


def test_grades_cli_dispatches_ttc(tmp_path, capsys):
    from grades.cli import main as grades_main
    assert grades_main(["ttc", str(small_jsonl(tmp_path)), "--strategies", "majority@k"]) == 0
    assert "majority@k" in capsys.readouterr().out


def test_cli_best_of_k_with_scores(tmp_path, capsys):
    # the scorer ranks the correct sample first: best-of-k reaches 1.0 as soon as it can be drawn
    cks = []
    for name, flops in (("early", 1e12), ("late", 3e12)):
        n_ok = 1 if name == "early" else 3
        answers = [["7"] * n_ok + [f"w{j}" for j in range(4 - n_ok)] for _ in range(3)]
        correct = [[True] * n_ok + [False] * (4 - n_ok) for _ in range(3)]
        scores = [[1.0] * n_ok + [0.0] * (4 - n_ok) for _ in range(3)]
        cks.append(samples_from_completions(name, flops, ["p0", "p1", "p2"], answers, correct, scores))
    p = tmp_path / "scored.jsonl"
    write_samples(p, cks)
    out = tmp_path / "r.json"
    assert ttc_main([str(p), "--strategies", "best-of-k", "majority", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["strategies"] == ["best-of-k", "majority@k"]
    # target = late's accuracy at k=1 (0.75); early best-of-4 = 1.0 (pass@4 of one correct of 4)
    best = [r for r in res["table"] if r["checkpoint"] == "early" and r["strategy"] == "best-of-k"]
    assert [r["accuracy"] for r in best] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert res["min_train"]["checkpoint"] == "early" and res["min_train"]["k"] == 3
    assert res["min_train"]["strategy"] == "best-of-k"
    assert "best-of-k left out" not in capsys.readouterr().err
    # default strategies: best-of-k is left out when a sample has no score, and the CLI says so
    cks[1].problems["p2"][3] = Sample("w0", False, None)
    write_samples(p, cks)
    assert ttc_main([str(p)]) == 0
    assert "best-of-k left out: checkpoint 'late' has samples without a 'score'" in capsys.readouterr().err


def test_empty_checkpoints_refused():
    with pytest.raises(ValueError, match="no checkpoints"):
        select([], k_max=1)
    with pytest.raises(ValueError, match="has no problems"):
        select([CheckpointSamples("empty", 1.0), hand_checkpoints()[0]], k_max=1)
    a, b = hand_checkpoints()[:2]
    b.problems = {"other": b.problems[0]}
    with pytest.raises(ValueError, match="no problem is shared"):
        select([a, b], k_max=1)
    with pytest.raises(ValueError, match="no problems given"):
        pass_at_k([], 1)


# ---------------------------------------------------------------------------------------------
# input validation (review fixes)
# ---------------------------------------------------------------------------------------------
def test_checkpoint_only_on_non_utf8_lines_is_refused(tmp_path, capsys):
    p = small_jsonl(tmp_path)
    p.write_bytes(p.read_bytes() + b'{"checkpoint": "final", "train_flops": 9e12, "problem": 0, '
                  b'"samples": [{"answer": "\xe9", "correct": true}]}\n')
    with pytest.raises(SamplesFormatError, match="checkpoint 'final' appears only on malformed lines.*UTF-8"):
        load_samples(p)
    assert ttc_main([str(p)]) == 2
    assert "checkpoint 'final' appears only on malformed lines" in capsys.readouterr().err


def test_select_tied_reference_does_not_depend_on_order():
    a = samples_from_completions("Y", 4e12, [0, 1], [["a", "b"]] * 2, [[True, False]] * 2)
    b = samples_from_completions("X", 4e12, [0, 1], [["a", "a"]] * 2, [[True, True]] * 2)
    early = samples_from_completions("W", 1e12, [0, 1], [["a", "b"]] * 2, [[True, False]] * 2)
    for cks in ([a, b], [b, a], [early, a, b], [a, early, b]):
        s = select(cks, k_max=1)
        assert (s.reference, s.target) == ("X", 1.0)  # the tied checkpoint whose name sorts first
    # ties below the reference do not depend on the order either
    c = samples_from_completions("V", 1e12, [0, 1], [["a", "b"]] * 2, [[True, False]] * 2)
    s1, s2 = select([early, c, b], k_max=1, target=0.5), select([c, early, b], k_max=1, target=0.5)
    assert s1.min_train.checkpoint == s2.min_train.checkpoint == "V"


def test_cli_plot_extension_checked_up_front_and_json_valid(tmp_path, capsys):
    p = small_jsonl(tmp_path)
    out = tmp_path / "o.json"
    assert ttc_main([str(p), "--plot", str(tmp_path / "out.txt"), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unsupported file extension 'txt'" in err and "Traceback" not in err and not out.exists()
    # the JSON is written even when the plot cannot be
    assert ttc_main([str(p), "--plot", str(tmp_path / "no" / "x.png"), "--json", str(out)]) == 2
    assert "cannot write" in capsys.readouterr().err
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON token {c}"))
    assert ttc_main([str(p), "--strategies", "pass,majority", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["strategies"] == ["pass@k", "majority@k"]


def test_non_finite_tolerance_and_totals_refused(tmp_path, capsys):
    p = small_jsonl(tmp_path)
    assert ttc_main([str(p), "--tolerance", "inf"]) == 2
    assert "tolerance must be a finite number" in capsys.readouterr().err
    out = tmp_path / "o.json"
    assert ttc_main([str(p), "--queries", "1e300", "--infer-flops", "1e300", "--json", str(out)]) == 2
    assert "overflow" in capsys.readouterr().err and not out.exists()
    cks = load_samples(p)
    for tol in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match="tolerance"):
            select(cks, k_max=2, tolerance=tol)
    # numpy scalars are numbers
    s = select(cks, k_max=np.int64(2), target=np.float32(0.5), tolerance=np.float32(0.1),
               queries=np.float32(3), infer_flops_per_sample=np.float64(1e9), final_train_flops=np.int64(10**13))
    assert s.threshold == pytest.approx(0.4) and s.queries == 3.0
    json.dumps(s.to_dict(), allow_nan=False)


def test_write_samples_validates_first_and_is_atomic(tmp_path):
    p = small_jsonl(tmp_path)
    before = p.read_bytes()
    good = load_samples(p)
    bad_cases = [
        (CheckpointSamples("z", 1.0, {(1, 2): [Sample("a", True)]}), TypeError, "problem ids"),
        (CheckpointSamples("z", 1.0, {True: [Sample("a", True)]}), TypeError, "problem ids"),
        (CheckpointSamples("z", 1.0, {0: [Sample(None, True)]}), TypeError, "string answer"),
        (CheckpointSamples("z", 1.0, {0: [Sample("a", True, float("nan"))]}), ValueError, "finite"),
        (CheckpointSamples("z", 1.0, {0: [Sample("a", "False")]}), TypeError, "verdict"),
    ]
    for ck, exc, msg in bad_cases:
        with pytest.raises(exc, match=msg):
            write_samples(p, good + [ck])
        assert p.read_bytes() == before
    assert list(tmp_path.glob("*.tmp")) == []
    ck = CheckpointSamples("z", 1.0, {np.int64(3): [Sample("a", np.bool_(True), np.float32(0.5))]})
    assert write_samples(p, [ck]) == 1
    assert load_samples(p)[0].problems == {3: [Sample("a", True, 0.5)]}


def test_verdicts_must_be_bools_or_0_1():
    for bad in ("False", "True", 2, 0.5, None):
        with pytest.raises(TypeError, match="verdict"):
            samples_from_completions("c", 1.0, [0], [["a"]], [[bad]])
    ck = samples_from_completions("c", 1.0, [0], [["a", "b", "c"]], [[np.bool_(True), 0, np.int64(0)]])
    assert [s.correct for s in ck.problems[0]] == [True, False, False]
    with pytest.raises(ValueError, match="finite"):
        samples_from_completions("c", 1.0, [0], [["a"]], [[True]], [["nan"]])


def test_flop_accounting_refuses_non_finite_and_non_counts():
    from grades.demo.models import llama_config
    cfg = llama_config(vocab_size=15, size="tiny")
    nan = float("nan")
    for call in (lambda: training_flops(cfg, nan), lambda: training_flops(cfg, math.inf),
                 lambda: training_flops(cfg, 1.5), lambda: training_flops(cfg, 10, seq_len=nan),
                 lambda: training_flops(cfg, 10, seq_len=2.5), lambda: inference_flops_per_token(cfg, nan),
                 lambda: inference_flops_per_token(cfg, 1.5), lambda: FlopLedger(cfg, seq_len=0),
                 lambda: FlopLedger(cfg, seq_len=nan), lambda: FlopLedger(cfg).add_step(nan),
                 lambda: FlopLedger(cfg).add_eval(nan), lambda: FlopLedger(cfg).add_eval(-1.0),
                 lambda: FlopLedger(cfg).summary(planned_tokens=nan),
                 lambda: break_even_queries(nan, 2, 1.0), lambda: break_even_queries(math.inf, 1, 1.0),
                 lambda: break_even_queries(1.0, 2, nan), lambda: break_even_queries(1.0, True, 1.0),
                 lambda: inference_flops_per_sample(cfg, True, 1)):
        with pytest.raises((ValueError, TypeError)):
            call()
    # numpy integers and whole floats are counts
    assert training_flops(cfg, np.int64(10), seq_len=np.int64(8)) == training_flops(cfg, 10.0, seq_len=8)
    assert inference_flops_per_sample(cfg, np.int64(4), np.int32(2)) == inference_flops_per_sample(cfg, 4, 2)
    assert inference_flops_per_token(cfg, np.int64(3)) == inference_flops_per_token(cfg, 3)


def test_majority_mc_draws_must_be_positive_int():
    for bad in (True, 2.5, 0, float("nan"), math.inf):
        with pytest.raises(ValueError, match="mc_draws"):
            majority_at_k([["a", "b"]], [[True, False]], 1, method="monte-carlo", mc_draws=bad)
    e = majority_at_k([["a", "b"]], [[True, False]], 1, method="monte-carlo", mc_draws=np.int64(10))
    assert e.method == "monte-carlo"
