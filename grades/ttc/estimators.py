"""Test-time-compute estimators: accuracy at every k from one set of n samples per problem.

All three estimators take, for each of P problems, the same kind of data about n_p samples drawn
once (n_p may differ between problems), and return the expected accuracy when k of those samples
are drawn uniformly at random *without replacement*, for every requested k at once:

* :func:`pass_at_k` -- probability that at least one of the k samples is correct
  (``1 - C(n-c, k) / C(n, k)``). This needs an oracle verifier at test time: it is an upper bound
  on what a deployable selector can reach, not a deployable accuracy.
* :func:`majority_at_k` -- expected correctness of the plurality answer among the k samples.
  Ties between answers with the same top count are broken uniformly at random; the value is the
  exact expectation (a tie between one correct and one wrong answer contributes 1/2).
* :func:`best_of_k` -- expected correctness of the highest-scored of the k samples (a reward
  model or any scorer). Equal scores are broken uniformly at random among the tied samples.

Each returns an :class:`Estimate`: per-problem values ``[P, K]``, their mean over problems and the
standard error of that mean (sample standard deviation over problems / sqrt(P); NaN for P = 1).
Requesting k > n_p for any problem raises ``ValueError``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np
from scipy.special import gammaln

__all__ = ["Estimate", "pass_at_k", "majority_at_k", "best_of_k", "MC_EXACT_LIMIT"]

#: ``majority_at_k`` computes the exact expectation while the largest intermediate coefficient of
#: its generating-function recursion stays below ``exp(MC_EXACT_LIMIT)`` (about 1e282); beyond that
#: (k_max in the hundreds with n in the thousands) it falls back to Monte Carlo, see its docstring.
MC_EXACT_LIMIT = 650.0


@dataclass
class Estimate:
    """Accuracy at each k, averaged over problems.

    Attributes:
        strategy: ``"pass@k"``, ``"majority@k"`` or ``"best-of-k"``.
        ks: the k values, shape ``[K]`` (int).
        per_problem: expected accuracy of each problem at each k, shape ``[P, K]`` in [0, 1].
        mean: mean over problems, shape ``[K]``.
        se: standard error of the mean over problems, shape ``[K]`` (NaN when P = 1).
        method: ``"exact"`` or ``"monte-carlo"`` (majority only; see :func:`majority_at_k`).
        mc_error_bound: for Monte Carlo, a bound on the absolute error of ``mean`` due to the
            Monte Carlo draws that holds at every k simultaneously with probability
            ``1 - mc_delta`` (0 when exact).
    """

    strategy: str
    ks: np.ndarray
    per_problem: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    method: str = "exact"
    mc_error_bound: float = 0.0

    def at(self, k: int) -> tuple[float, float]:
        """``(mean, se)`` at one k (which must be one of ``ks``)."""
        idx = np.nonzero(self.ks == _as_ks(k)[0])[0]
        if idx.size == 0:
            raise ValueError(f"k={k} was not estimated (ks = {self.ks.tolist()})")
        return float(self.mean[idx[0]]), float(self.se[idx[0]])

    @property
    def n_problems(self) -> int:
        return int(self.per_problem.shape[0])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_ks(k: int | Iterable[int]) -> np.ndarray:
    """``k`` (one k or a sequence of them) as an int64 array; refuses bools, strings and non-whole
    numbers instead of truncating them."""
    if isinstance(k, np.ndarray) and k.ndim == 0:
        k = k.item()
    seq = [k] if isinstance(k, (int, float, np.number)) else k
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
        raise TypeError(f"k must be an int or a sequence of ints, got {type(k).__name__}")
    vals = []
    for x in seq:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
            raise TypeError(f"k must be an int or a sequence of ints, got an element of type "
                            f"{type(x).__name__}")
        if not float(x).is_integer():
            raise ValueError(f"k must be whole numbers, got {x!r}")
        vals.append(int(x))
    ks = np.array(vals, dtype=np.int64)
    if ks.size == 0:
        raise ValueError("no k values requested")
    if (ks < 1).any():
        raise ValueError(f"k must be >= 1, got {ks.min()}")
    return ks


def _check_k_le_n(ks: np.ndarray, ns: Sequence[int]) -> None:
    if len(ns) == 0:
        raise ValueError("no problems given")
    nmin = min(ns)
    if nmin < 1:
        raise ValueError("a problem has no samples")
    if ks.max() > nmin:
        raise ValueError(f"k={int(ks.max())} exceeds the number of samples n={nmin} of a problem "
                         "(k must be <= n: draw at least k_max samples per problem)")


def _summarise(strategy: str, ks: np.ndarray, per: np.ndarray, method: str = "exact",
               bound: float = 0.0) -> Estimate:
    mean = per.mean(axis=0)
    if per.shape[0] > 1:
        se = per.std(axis=0, ddof=1) / math.sqrt(per.shape[0])
    else:
        se = np.full(ks.shape, np.nan)
    return Estimate(strategy, ks, per, mean, se, method, bound)


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    """Clip float rounding (``|excess| <= 1e-9``) back into [0, 1]; anything larger is a bug, raised."""
    if v.size and (v.min() < -1e-9 or v.max() > 1 + 1e-9):
        raise FloatingPointError(f"{what}: a probability came out as {v.min() if v.min() < 0 else v.max()!r}, "
                                 "outside [0, 1] beyond rounding")
    return np.clip(v, 0.0, 1.0)


def _log_none_ratio(n: int, bad: int, kmax: int) -> np.ndarray:
    """``log(C(n - bad, k) / C(n, k))`` for k = 1..kmax, as a product of ratios (no overflow).

    ``C(n-bad, k)/C(n, k) = prod_{i<k} (1 - bad/(n-i))``; it is 0 (log = -inf) once k > n - bad.
    """
    i = np.arange(kmax, dtype=np.float64)
    out = np.full(kmax, -np.inf)
    good = i < (n - bad)
    if bad == 0:
        return np.zeros(kmax)
    with np.errstate(divide="ignore"):
        terms = np.log1p(-bad / (n - i[good]))
    out[good] = np.cumsum(terms)
    return out


def _bool_rows(correct: Sequence[Sequence[bool]], name: str = "correct") -> list[np.ndarray]:
    if isinstance(correct, (str, bytes)) or not isinstance(correct, Sequence) and not isinstance(correct, np.ndarray):
        raise TypeError(f"{name} must be a sequence (one entry per problem) of sequences of bools")
    rows = []
    for p, row in enumerate(correct):
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise TypeError(f"{name}[{p}] must be a 1-D sequence of bools")
        if arr.dtype != np.bool_:
            if arr.size and not np.isin(arr, (0, 1)).all():
                raise TypeError(f"{name}[{p}] must contain bools (or 0/1)")
            arr = arr.astype(bool)
        rows.append(arr)
    return rows


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------
def pass_at_k(correct: Sequence[Sequence[bool]], k: int | Iterable[int]) -> Estimate:
    """Unbiased pass@k for every k in ``k``, from ``correct[p][i]`` (sample i of problem p).

    Per problem with n samples of which c are correct: ``1 - C(n-c, k) / C(n, k)``, computed as
    ``-expm1(sum_{i<k} log1p(-c/(n-i)))`` -- stable for n in the thousands.

    Args:
        correct: ``P`` sequences of booleans (``n_p`` samples each).
        k: one k or a sequence of k values, each in ``[1, min_p n_p]``.
    """
    rows = _bool_rows(correct)
    ks = _as_ks(k)
    _check_k_le_n(ks, [len(r) for r in rows])
    kmax = int(ks.max())
    per = np.empty((len(rows), ks.size))
    done: dict[tuple[int, int], np.ndarray] = {}  # problems sharing (n, c) share their values
    for p, r in enumerate(rows):
        key = (r.size, int(r.sum()))
        if key not in done:
            # probability that none of the k is correct = C(n-c,k)/C(n,k)
            done[key] = -np.expm1(_log_none_ratio(key[0], key[1], kmax)[ks - 1])
        per[p] = done[key]
    return _summarise("pass@k", ks, per)


# --------------------------------------------------------------------------------------------
# best-of-k
# --------------------------------------------------------------------------------------------
def _max_group_probs(starts: np.ndarray, ends: np.ndarray, n: int, ks: np.ndarray,
                     chunk: int = 1 << 15) -> np.ndarray:
    """``(C(e, k) - C(s, k)) / C(n, k)`` for each group ``[s, e)`` and each k: shape ``[G, K]``."""
    kmax = int(ks.max())
    i = np.arange(kmax, dtype=np.float64)[None, :]
    out = np.empty((starts.size, ks.size))
    for lo in range(0, starts.size, chunk):
        s = starts[lo:lo + chunk].astype(np.float64)[:, None]
        e = ends[lo:lo + chunk].astype(np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            # log C(e, k)/C(n, k) and log C(s, k)/C(e, k), as cumulative sums over i < k
            log_qe = np.cumsum(np.where(i < e, np.log1p(-(n - e) / (n - i)), -np.inf), axis=1)
            log_r = np.cumsum(np.where(i < s, np.log1p(-(e - s) / np.maximum(e - i, 1.0)), -np.inf), axis=1)
        qe, r = log_qe[:, ks - 1], log_r[:, ks - 1]
        out[lo:lo + chunk] = np.where(np.isfinite(qe), np.exp(qe) * -np.expm1(r), 0.0)
    return out


def best_of_k(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]],
              k: int | Iterable[int]) -> Estimate:
    """Expected correctness of the highest-scored of k random samples (without replacement).

    Sort a problem's n samples by score. A group of b samples sharing one score, with a samples
    scored strictly lower, holds the subset's maximum with probability
    ``(C(a+b, k) - C(a, k)) / C(n, k)``; given that, the sample kept is uniform among the group's
    members in the subset, so its expected correctness is the group's mean correctness. Without
    ties this is the rank formula: the sample of rank r (1 = lowest) is the maximum with
    probability ``C(r-1, k-1) / C(n, k)``.

    Precision: the binomial ratios are exact products of ratios summed in log space
    (``log C(m, k) / C(n, k) = sum_{i<k} log1p(-(n - m) / (n - i))``) and each group's difference
    ``C(a+b, k) - C(a, k)`` is taken as ``C(a+b, k) (1 - C(a, k) / C(a+b, k))`` with ``expm1``, so
    there is no cancellation when ``b << a``: the result stays exact to about 1e-12 relative for n
    in the millions (no ``lgamma`` of large arguments). Per-problem sums over groups use
    ``math.fsum``. Cost: memory and time ``O(groups x k_max)`` per problem.

    Args:
        scores: ``P`` sequences of finite floats (higher is better), aligned with ``correct``.
        correct: ``P`` sequences of booleans.
        k: one k or a sequence of k values in ``[1, min_p n_p]``.
    """
    rows = _bool_rows(correct)
    if len(scores) != len(rows):
        raise ValueError(f"scores has {len(scores)} problems, correct has {len(rows)}")
    ks = _as_ks(k)
    _check_k_le_n(ks, [len(r) for r in rows])
    per = np.empty((len(rows), ks.size))
    for p, (sc, r) in enumerate(zip(scores, rows)):
        s = np.asarray(sc, dtype=np.float64)
        if s.shape != r.shape:
            raise ValueError(f"problem {p}: {s.size} scores for {r.size} samples")
        if not np.isfinite(s).all():
            raise ValueError(f"problem {p}: scores must be finite")
        n = r.size
        order = np.argsort(s, kind="stable")
        s_sorted, y_sorted = s[order], r[order].astype(np.float64)
        # boundaries of equal-score groups in ascending order
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
        ends = np.r_[starts[1:], n]
        ybar = np.add.reduceat(y_sorted, starts) / (ends - starts)
        probs = _max_group_probs(starts, ends, n, ks)
        acc = np.array([math.fsum(col) for col in (ybar[:, None] * probs).T])
        per[p] = _unit(acc, f"best-of-k, problem {p}")
    return _summarise("best-of-k", ks, per)


# --------------------------------------------------------------------------------------------
# majority@k
# --------------------------------------------------------------------------------------------
def _log_comb(n: int, k: np.ndarray | int) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def _groups(answers: Sequence[Hashable], correct: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    counts: dict = {}
    corr: dict = {}
    for a, y in zip(answers, correct):
        try:
            counts[a] = counts.get(a, 0) + 1
        except TypeError:
            raise TypeError(f"problem {p}: answers must be hashable (e.g. strings)") from None
        if a in corr and corr[a] != bool(y):
            raise ValueError(f"problem {p}: answer {a!r} is marked both correct and incorrect; "
                             "majority voting needs one correctness per distinct answer")
        corr[a] = bool(y)
    keys = list(counts)
    return np.array([counts[a] for a in keys], dtype=np.int64), np.array([corr[a] for a in keys])


def _majority_exact_one(m: np.ndarray, y: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Exact majority@k for one problem with answer-group sizes ``m`` and correctness ``y``.

    For a correct group g and a count t >= 1, the generating polynomial (in z = samples drawn,
    w = number of other groups that also reach t) of the other groups restricted to counts <= t
    gives, for every k at once, the number of k-subsets in which g draws t samples and wins a
    (1 + j)-way tie; it wins that tie with probability 1/(1 + j). Coefficients are scaled by
    r^(degree) with ``r = C(n, kmax)^(-1/kmax)`` to stay within float range.
    """
    n = int(m.sum())
    kmax = int(ks.max())
    out = np.zeros(ks.size)
    if not y.any():
        return out
    logc_n = _log_comb(n, np.arange(kmax + 1))
    logr = -logc_n[kmax] / kmax if kmax > 0 else 0.0
    # P(k) denominators: C(n,k) r^k
    log_den = logc_n + np.arange(kmax + 1) * logr
    res = np.zeros(kmax + 1)
    for g in np.flatnonzero(y):
        mg = int(m[g])
        others = np.delete(m, g)
        for t in range(1, min(mg, kmax) + 1):
            deg = kmax - t
            small = int(others[others < t].sum())
            big = others[others >= t]
            jmax = min(big.size, deg // t) if t > 0 else 0
            s = np.arange(deg + 1)
            # (1 + rz)^small, truncated
            st = np.zeros((jmax + 1, deg + 1))
            st[0] = np.where(s <= small, np.exp(_log_comb(small, np.minimum(s, small)) + s * logr), 0.0)
            xs = np.arange(t)
            for mh in big:
                a_poly = np.exp(_log_comb(int(mh), xs) + xs * logr)[: deg + 1]
                b_coef = math.exp(float(_log_comb(int(mh), t)) + t * logr)
                new = np.zeros_like(st)
                for j in range(jmax + 1):
                    if not st[j].any():
                        continue
                    new[j] += np.convolve(st[j], a_poly)[: deg + 1]
                    if j + 1 <= jmax and t <= deg:
                        new[j + 1, t:] += st[j, : deg + 1 - t] * b_coef
                st = new
            weights = 1.0 / (1.0 + np.arange(jmax + 1))
            tot = weights @ st  # [deg+1]: by s = k - t
            lead = float(_log_comb(mg, t)) + t * logr
            kk = np.arange(t, kmax + 1)
            res[kk] += tot[kk - t] * np.exp(lead - log_den[kk])
    return _unit(res[ks], "majority@k")


def _max_log_coeff(n: int, kmax: int) -> float:
    logc = _log_comb(n, np.arange(kmax + 1))
    s = np.arange(kmax + 1)
    return float(np.max(logc - s * logc[kmax] / kmax))


def _majority_mc_one(codes: np.ndarray, y_of_code: np.ndarray, ks: np.ndarray, draws: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Monte Carlo majority@k: the first k entries of a random permutation are a uniform k-subset
    for every k at once, so each draw scores all k from one permutation prefix."""
    n = codes.size
    kmax = int(ks.max())
    total = np.zeros(kmax)
    chunk = max(1, int(2_000_000 // (kmax * kmax)))
    done = 0
    while done < draws:
        c = min(chunk, draws - done)
        onehot = np.zeros((c, kmax, kmax))
        yrow = np.zeros((c, kmax))
        for r in range(c):
            pref = codes[rng.permutation(n)[:kmax]]
            uniq, inv = np.unique(pref, return_inverse=True)
            onehot[r, np.arange(kmax), inv] = 1.0
            yrow[r, :uniq.size] = y_of_code[uniq]
        cnt = np.cumsum(onehot, axis=1)  # [c, k, group]: counts among the first k draws
        top = (cnt == cnt.max(axis=2, keepdims=True)) & (cnt > 0)
        total += ((top * yrow[:, None, :]).sum(axis=2) / top.sum(axis=2)).sum(axis=0)
        done += c
    return total[ks - 1] / draws


def majority_at_k(answers: Sequence[Sequence[Hashable]], correct: Sequence[Sequence[bool]],
                  k: int | Iterable[int], *, method: str = "auto", mc_draws: int = 2000,
                  mc_delta: float = 0.01, seed: int = 0) -> Estimate:
    """Expected correctness of the plurality answer of k random samples (without replacement).

    Samples vote with their ``answers`` (compared for equality; normalise them first, e.g. strip
    whitespace). All samples with one answer must share one correctness value (``ValueError``
    otherwise). Ties for the top count are broken uniformly at random among the tied answers, and
    the returned value is the exact expectation of that rule.

    ``method="exact"`` (and ``"auto"`` whenever float range allows, which covers k_max up to the
    low hundreds for any n) sums over answer-count configurations with a generating-function
    recursion; its cost grows with k_max and the number of distinct answers, not with n.
    ``method="monte-carlo"`` (used by ``"auto"`` only beyond that) draws ``mc_draws``
    random permutations per problem (the first k entries of each are a uniform k-subset, for every k
    at once). At one k the mean over P problems is a mean of ``mc_draws * P`` independent values in
    [0, 1], so by Hoeffding's inequality and a union bound over the K requested k values it is
    within ``sqrt(log(2 K / mc_delta) / (2 * mc_draws * P))`` of the exact value at every k
    simultaneously, with probability ``1 - mc_delta`` (reported as ``Estimate.mc_error_bound``).

    Args:
        answers: ``P`` sequences of hashable answers (``n_p`` each).
        correct: ``P`` sequences of booleans aligned with ``answers``.
        k: one k or a sequence of k values in ``[1, min_p n_p]``.
    """
    rows = _bool_rows(correct)
    if len(answers) != len(rows):
        raise ValueError(f"answers has {len(answers)} problems, correct has {len(rows)}")
    if method not in ("auto", "exact", "monte-carlo"):
        raise ValueError(f"method must be 'auto', 'exact' or 'monte-carlo', got {method!r}")
    if isinstance(mc_draws, (bool, np.bool_)) or not isinstance(mc_draws, numbers.Integral) or mc_draws < 1:
        raise ValueError(f"mc_draws must be an integer >= 1, got {mc_draws!r}")
    mc_draws = int(mc_draws)
    if not 0 < mc_delta < 1:
        raise ValueError(f"mc_delta must be in (0, 1), got {mc_delta!r}")
    ks = _as_ks(k)
    for p, (a, r) in enumerate(zip(answers, rows)):
        if isinstance(a, (str, bytes)) or len(a) != r.size:
            raise ValueError(f"problem {p}: answers must be a sequence aligned with correct "
                             f"({r.size} samples)")
    _check_k_le_n(ks, [len(r) for r in rows])
    kmax = int(ks.max())
    per = np.empty((len(rows), ks.size))
    use_mc = False
    if method == "monte-carlo":
        use_mc = True
    elif method == "auto":
        use_mc = any(_max_log_coeff(r.size, kmax) > MC_EXACT_LIMIT for r in rows)
    elif any(_max_log_coeff(r.size, kmax) > MC_EXACT_LIMIT for r in rows):
        raise ValueError(f"exact majority@k would overflow for k_max={kmax}; use method='auto' "
                         "or 'monte-carlo'")
    rng = np.random.default_rng(seed)
    for p, (a, r) in enumerate(zip(answers, rows)):
        m, y = _groups(a, r, p)
        if use_mc:
            lookup = {}
            codes = np.array([lookup.setdefault(x, len(lookup)) for x in a])
            per[p] = _majority_mc_one(codes, y.astype(np.float64), ks, mc_draws, rng)
        else:
            per[p] = _majority_exact_one(m, y, ks)
    bound = math.sqrt(math.log(2 * ks.size / mc_delta) / (2 * mc_draws * len(rows))) if use_mc else 0.0
    return _summarise("majority@k", ks, per, "monte-carlo" if use_mc else "exact", bound)
