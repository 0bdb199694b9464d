"""TTCMonitor across two gloo ranks: each rank samples half the problems, the verdicts are gathered,
every rank takes rank 0's decision, which is the one a single process takes on the same problems."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch.distributed as dist

from dist_util import run_workers
from grades.ttc import TTCMonitor

pytestmark = pytest.mark.distributed

PROBLEMS = list(range(7))  # odd: the ranks get 4 and 3
FLOPS = [i * 1e14 for i in range(1, 10)]


def sample_fn(q, problems, n, seen=None):
    """Problem p at quality q: round(q * n) - (p % 2) correct samples, distinct wrong answers."""
    if seen is not None:
        seen.extend(problems)
    out = []
    for p in problems:
        good = max(0, int(round(q * n)) - p % 2)
        out.append(["ok"] * good + [f"w{j}" for j in range(n - good)])
    return out


def curve(f):
    return 0.8 - 0.7 * math.exp(-f / 3e14)


def monitor(**kw):
    return TTCMonitor(PROBLEMS, sample_fn=kw.pop("fn", sample_fn), verifier=lambda p, c: c == "ok",
                      n_samples=10, k_max=4, strategies=["majority", "pass"], target="projection",
                      planned_train_flops=1e15, tolerance=0.01, **kw)


def summary(d):
    return {"stop": d.stop, "target": d.target, "reason": d.reason,
            "choice": None if d.choice is None else [d.choice.k, d.choice.strategy],
            "accuracy": d.accuracy}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict = {}
    try:
        seen: list = []
        mon = monitor(fn=lambda q, probs, n: sample_fn(q, probs, n, seen))
        decisions = []
        for i, f in enumerate(FLOPS):
            decisions.append(summary(mon.evaluate(curve(f), step=i + 1, train_flops=f)))
        res["decisions"], res["seen"] = decisions, seen
        res["correct"] = [ck.correct() for ck in mon.checkpoints]
        res["samples_drawn"] = mon.samples_drawn
        # a rank that disagrees (other FLOPs) is refused on every rank, with the same message
        try:
            mon.evaluate(curve(1e15), step=99, train_flops=1e15 + rank)
        except ValueError as e:
            res["mismatch"] = str(e)
        # a rank whose sampling fails does not leave the other waiting
        def failing(q, probs, n):
            if rank == 1:
                raise RuntimeError("sampler broke")
            return sample_fn(q, probs, n)
        try:
            monitor(fn=failing).evaluate(0.5, step=1, train_flops=1.0)
        except RuntimeError as e:
            res["failure"] = str(e)
        # distributed=False: every rank samples everything
        seen_all: list = []
        monitor(fn=lambda q, probs, n: sample_fn(q, probs, n, seen_all), distributed=False).evaluate(0.5, 1, 1.0)
        res["unsharded_seen"] = seen_all
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ttc_shard"))
    return run_workers(_worker, 2, out)


def test_ranks_share_the_problems_and_the_decision(results):
    r0, r1 = results
    assert sorted(set(r0["seen"])) == [0, 2, 4, 6] and sorted(set(r1["seen"])) == [1, 3, 5]
    assert r0["decisions"] == r1["decisions"] and r0["correct"] == r1["correct"]
    assert r0["samples_drawn"] == r1["samples_drawn"] == len(FLOPS) * len(PROBLEMS) * 10
    # the same as one process with all the problems
    single = monitor(distributed=False)
    want = [summary(single.evaluate(curve(f), step=i + 1, train_flops=f)) for i, f in enumerate(FLOPS)]
    assert r0["decisions"] == json.loads(json.dumps(want))
    assert any(d["stop"] for d in want), "the run should reach a stop"


def test_disagreeing_or_failing_ranks_are_refused_on_every_rank(results):
    r0, r1 = results
    assert r0["mismatch"] == r1["mismatch"] and "rank 1 disagrees with rank 0" in r0["mismatch"]
    assert "train_flops" in r0["mismatch"]
    assert r0["failure"] == r1["failure"] and "rank 1" in r0["failure"] and "sampler broke" in r0["failure"]
    assert sorted(r0["unsharded_seen"]) == PROBLEMS


def test_distributed_true_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        monitor(distributed=True).evaluate(0.5, 1, 1.0)
    with pytest.raises(ValueError, match="distributed"):
        monitor(distributed="yes")
