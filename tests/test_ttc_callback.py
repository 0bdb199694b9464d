"""TTCMonitor / TTCEarlyStopping: sampling, verification, recording and the stop decision."""
from __future__ import annotations

import math

import pytest
import torch

from grades.ttc import TTCEarlyStopping, TTCMonitor, load_samples, training_flops


# ---------------------------------------------------------------------------------------------
# model-free: a stub "model" is a quality q in [0, 1]; a fraction q of samples are correct
# ---------------------------------------------------------------------------------------------
def stub_sample_fn(q, problems, n):
    good = int(round(q * n))
    return [["ok"] * good + [f"w{j}" for j in range(n - good)] for _ in problems]


def stub_verifier(problem, completion):
    return completion == "ok"


def curve(f):
    return 0.8 - 0.7 * math.exp(-f / 3e14)


def test_monitor_projection_waits_then_stops():
    mon = TTCMonitor(list(range(5)), sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=20,
                     k_max=8, strategies=["majority"], target="projection", planned_train_flops=1e15,
                     min_checkpoints=4)
    decisions = []
    for i, f in enumerate([1e14, 2e14, 3e14, 4e14, 5e14, 6e14]):
        decisions.append(mon.evaluate(curve(f), step=i + 1, train_flops=f))
        if decisions[-1].stop:
            break
    assert all("waits" in d.reason for d in decisions[:3])
    assert all(d.target is None and not d.stop for d in decisions[:4])
    assert "no projection yet" in decisions[3].reason and "need 5" in decisions[3].reason
    last = decisions[-1]
    assert last.stop, [d.reason for d in decisions]
    # the projection at 1e15 brackets the curve's value there (0.8 - 0.7 e^-3.3 = 0.774); the target
    # is this checkpoint's k=1 accuracy plus the bound on the gain still to come
    proj = last.projection
    assert proj.lower <= curve(1e15) <= proj.upper
    assert last.target == pytest.approx(min(1.0, proj.last_accuracy + proj.gain_upper))
    assert proj.point == pytest.approx(curve(1e15), abs=0.06)
    assert decisions[4].projection.ok and decisions[4].target == 1.0 and not decisions[4].stop  # rising: wide
    c = last.choice
    assert c.strategy == "majority@k" and c.k <= 8 and c.accuracy >= last.target - 1e-9
    assert c.train_flops_saved == pytest.approx(1e15 - c.train_flops)
    assert mon.samples_drawn == len(decisions) * 5 * 20
    assert len(mon.checkpoints) == len(decisions)


def test_monitor_break_even_volume_blocks_stopping():
    kw = dict(sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=10, k_max=5,
              strategies=["majority"], target=0.75, planned_train_flops=1e15, infer_flops_per_sample=1e9)
    # 60% correct at this checkpoint: majority@k >= 0.75 needs k > 1, saving 7e14 FLOPs
    many = TTCMonitor([0, 1], expected_queries=1e9, **kw)
    d = many.evaluate(0.6, step=1, train_flops=3e14)
    assert not d.stop and "break-even" in d.reason
    few = TTCMonitor([0, 1], expected_queries=1e3, **kw)
    d = few.evaluate(0.6, step=1, train_flops=3e14)
    assert d.stop and d.choice.k > 1
    assert d.choice.break_even == pytest.approx(7e14 / ((d.choice.k - 1) * 1e9))
    assert 1e3 <= d.choice.break_even < 1e9


def test_monitor_stops_only_on_the_checkpoint_in_hand():
    """An earlier checkpoint that met the target (while the projection waited) has no weights left:
    it is reported, but only the current checkpoint can stop training."""
    def sample_fn(model, problems, n):  # model = (accuracy, all wrong samples give one answer)
        q, one_wrong = model
        good = int(round(q * n))
        return [["ok"] * good + ["w" if one_wrong else f"w{j}" for j in range(n - good)] for _ in problems]

    mon = TTCMonitor([0, 1], sample_fn=sample_fn, verifier=stub_verifier, n_samples=100, k_max=10,
                     strategies=["majority"], target="projection", planned_train_flops=1.4e14)
    for i, f in enumerate([2e13, 3e13, 4e13, 6e13, 8e13]):
        d = mon.evaluate((curve(f), i == 4), step=i + 1, train_flops=f)
    # step-5 is more accurate at k=1 (0.26) but its wrong answers agree: its majority vote fails
    assert d.projection.point == pytest.approx(0.335, abs=0.01)
    assert d.target == pytest.approx(0.26 + d.projection.gain_upper) and max(d.accuracy["majority@k"]) < d.target
    assert not d.stop and d.choice is None
    assert d.earliest.checkpoint == "step-1"
    assert f"the earlier step-1 met it with majority@k k={d.earliest.k} (its weights are not kept" in d.reason
    d = mon.evaluate((curve(1e14), False), step=6, train_flops=1e14)
    assert d.stop and d.choice.checkpoint == "step-6" and d.earliest.checkpoint == "step-1"


def test_monitor_reason_texts():
    kw = dict(sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=10, strategies=["majority"])
    # k > 1 needed: Q* is unknown without inference FLOPs, not infinite
    d = TTCMonitor([0], target=0.75, planned_train_flops=1e15, **kw).evaluate(0.6, 1, 3e14)
    assert d.stop and d.choice.k > 1 and d.choice.break_even is None
    assert d.reason.endswith("Q* unknown (give infer_flops_per_sample)")
    d = TTCMonitor([0], target=0.75, **kw).evaluate(0.6, 1, 3e14)
    assert d.reason.endswith("Q* unknown (give planned_train_flops)")
    d = TTCMonitor([0], target=0.5, planned_train_flops=1e15, **kw).evaluate(0.6, 1, 3e14)
    assert d.choice.k == 1 and d.reason.endswith("Q*=inf (no extra inference per query)")
    d = TTCMonitor([0], target=0.75, planned_train_flops=1e15, infer_flops_per_sample=1e9,
                   **kw).evaluate(0.6, 1, 3e14)
    assert d.reason.endswith(f"Q*={7e14 / ((d.choice.k - 1) * 1e9):.3g} queries")
    assert d.eval_flops == 10 * 1e9
    # no query volume declared: nothing about break-even when the target is out of reach
    d = TTCMonitor([0], target=0.99, k_max=3, **kw).evaluate(0.3, 1, 3e14)
    assert not d.stop and "break-even" not in d.reason
    assert d.reason.startswith("no k<=3 at step-1 reaches 0.9900")


def test_monitor_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        TTCMonitor([0], n_samples=4)
    with pytest.raises(ValueError):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4, k_max=5)
    with pytest.raises(ValueError, match="planned_train_flops"):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target="projection")
    with pytest.raises(ValueError, match="infer_flops_per_sample"):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target=0.5, expected_queries=10)
    # without planned_train_flops nothing is saved against any reference: it could never stop
    with pytest.raises(ValueError, match="planned_train_flops"):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target=0.5, expected_queries=10,
                   infer_flops_per_sample=1e9)
    # refused at construction, not at the first evaluation
    for bad in (dict(tolerance=-0.1), dict(tolerance="0.1"), dict(fit_model="cubic"), dict(min_checkpoints=0),
                dict(k_max=2.5), dict(max_extrapolation=-1.0), dict(infer_flops_per_sample=0.0),
                dict(problem_ids=["a", "a"]), dict(n_samples=4.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TTCMonitor([0, 1], sample_fn=stub_sample_fn, verifier=stub_verifier, target=0.5, **bad)
    mon = TTCMonitor([0], sample_fn=lambda m, p, n: [["ok"] * (n - 1)], verifier=stub_verifier,
                     n_samples=4, target=0.5)
    with pytest.raises(ValueError, match="expected 4"):
        mon.evaluate(None, 1, 0.0)
    mon = TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4, target=0.5)
    mon.evaluate(0.5, 1, 10.0)
    with pytest.raises(ValueError, match="decrease"):
        mon.evaluate(0.5, 2, 5.0)
    with pytest.raises(ValueError):
        mon.evaluate(0.5, 3, -1.0)
    # an evaluation that fails leaves nothing recorded; the next one works
    scores = iter([float("nan")] * 4 + [0.5] * 4)
    mon = TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, score_fn=lambda p, c: next(scores),
                     n_samples=4, strategies=["best-of-k"], target=0.5)
    with pytest.raises(ValueError, match="finite"):
        mon.evaluate(0.5, 1, 10.0)
    assert mon.checkpoints == [] and mon.decisions == []
    assert mon.evaluate(0.5, 2, 20.0).stop and [c.name for c in mon.checkpoints] == ["step-2"]
    # an answer_fn and a verifier that disagree (one answer, two verdicts) are named
    mon = TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, answer_fn=lambda c: "same",
                     n_samples=4, target=0.5)
    with pytest.raises(ValueError, match="problem 0: answer 'same' is marked both correct and incorrect"):
        mon.evaluate(0.5, 1, 10.0)


def test_callback_flop_sources_and_ledger():
    from types import SimpleNamespace
    from transformers import TrainerControl
    from grades.demo.models import llama_config
    from grades.ttc import FlopLedger
    kw = dict(sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=10, strategies=["majority"],
              target=0.99, infer_flops_per_sample=1e6)
    led = FlopLedger(llama_config(vocab_size=15, size="tiny"), seq_len=8)
    mon = TTCMonitor([0, 1], **kw)
    cb = TTCEarlyStopping(mon, eval_steps=2, ledger=led, flops_per_step=1.0)
    for step in range(1, 5):
        led.add_step(64)
        cb.on_step_end(None, SimpleNamespace(global_step=step), TrainerControl(), model=0.5)
    # the ledger's training FLOPs feed the monitor; its sampling (2 x 2 problems x 10) goes to eval_flops
    assert [d.train_flops for d in mon.decisions] == pytest.approx([2 * led.train_flops / 4, led.train_flops])
    assert led.eval_flops == 2 * 20 * 1e6 and led.summary()["eval_flops"] == led.eval_flops
    cb = TTCEarlyStopping(TTCMonitor([0], **kw), eval_steps=3, train_flops_fn=lambda st: 7.0 * st.global_step)
    control = cb.on_step_end(None, SimpleNamespace(global_step=3), TrainerControl(), model=0.5)
    assert cb.monitor.decisions[0].train_flops == 21.0
    assert control.should_training_stop and cb.stopped_at == 3  # 5 of 10 agree, the wrong 5 differ
    with pytest.raises(ValueError, match="infer_flops_per_sample"):
        TTCEarlyStopping(TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target=0.5),
                         eval_steps=1, ledger=led)
    with pytest.raises(TypeError, match="FlopLedger"):
        TTCEarlyStopping(mon, eval_steps=1, ledger=object())


# ---------------------------------------------------------------------------------------------
# a tiny Llama trained on the embedded addition task
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def addition():
    from grades.demo.tasks import AdditionTask
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead on a shared CPU
    yield AdditionTask(digits=1, seed=0, n_val=16, n_test=16)
    torch.set_num_threads(threads)


def test_monitor_in_plain_loop_samples_verifies_records_stops(addition, tmp_path):
    from grades.demo.models import tiny_llama
    task = addition
    torch.manual_seed(0)
    model = tiny_llama(task.vocab_size, "tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    calls = {"verify": 0}

    def verifier(ex, completion):
        calls["verify"] += 1
        return task.verify(ex, completion)

    mon = TTCMonitor(task.val, task=task, verifier=verifier, n_samples=8, k_max=8,
                     strategies=["pass@k", "majority@k"], target=0.4, seed=0)
    batches = task.iterate(32, seed=0)
    flops, decision, step = 0.0, None, 0
    for step in range(1, 61):
        b = next(batches)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        flops += training_flops(model.config, b["input_ids"].numel(), seq_len=b["input_ids"].shape[1])
        if step % 10 == 0:
            decision = mon.evaluate(model, step, flops)
            if decision.stop:
                break
    assert decision is not None and decision.stop, [d.reason for d in mon.decisions]
    assert step < 60
    evals = len(mon.decisions)
    assert mon.samples_drawn == evals * 16 * 8 == calls["verify"]
    assert all(not d.stop for d in mon.decisions[:-1])
    c = decision.choice
    assert c.k <= 8 and c.accuracy >= 0.4 and c.strategy in ("pass@k", "majority@k")
    # pass@1 == majority@1 == mean verdict of the recorded samples
    ck = mon.checkpoints[-1]
    mean1 = sum(sum(r) for r in ck.correct()) / (16 * 8)
    assert decision.accuracy["pass@k"][0] == pytest.approx(mean1)
    assert decision.accuracy["majority@k"][0] == pytest.approx(mean1)
    assert all(len(v) == 8 for v in ck.problems.values())
    # the recorded table round-trips through the JSONL format
    path = tmp_path / "rec.jsonl"
    assert mon.write(path) == evals * 16
    back = load_samples(path)
    assert [c.name for c in back] == [f"step-{d.step}" for d in mon.decisions]
    assert back[-1].train_flops == pytest.approx(flops)


def test_sampling_leaves_training_rng_alone(addition):
    from grades.demo.models import tiny_llama
    model = tiny_llama(addition.vocab_size, "tiny", seed=0)
    mon = TTCMonitor(addition.val[:4], task=addition, n_samples=4, target=0.5, seed=3)
    torch.manual_seed(11)
    want = torch.rand(5)
    torch.manual_seed(11)
    mon.evaluate(model, 1, 0.0)
    assert torch.equal(torch.rand(5), want)  # the default sampler seeds torch inside a fork
    # and is still reproducible: the same seed + step gives the same samples
    again = TTCMonitor(addition.val[:4], task=addition, n_samples=4, target=0.5, seed=3)
    again.evaluate(model, 1, 0.0)
    assert again.checkpoints[0].answers() == mon.checkpoints[0].answers()


def test_callback_stops_trainer(addition, tmp_path):
    from transformers import Trainer, TrainingArguments
    from grades.demo.models import tiny_llama
    task = addition
    model = tiny_llama(task.vocab_size, "tiny", seed=0)
    seq = task.prompt_len + task.answer_len + 1
    per_step = training_flops(model.config, 32 * seq, seq_len=seq)
    mon = TTCMonitor(task.val, task=task, n_samples=8, strategies=["pass@k"], target=0.4, seed=0)
    cb = TTCEarlyStopping(mon, eval_steps=10, flops_per_step=per_step)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=32,
                             learning_rate=3e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=[{"ex": e} for e in task.train],
                      data_collator=lambda feats: task.train_batch([f["ex"] for f in feats]),
                      callbacks=[cb])
    trainer.train()
    assert cb.stopped_at is not None and trainer.state.global_step == cb.stopped_at < 80
    assert [d.step for d in mon.decisions] == list(range(10, cb.stopped_at + 1, 10))
    assert mon.decisions[-1].train_flops == pytest.approx(per_step * cb.stopped_at)
    with pytest.raises(ValueError):
        TTCEarlyStopping(mon, eval_steps=10)


def test_monitor_verdicts_ids_and_numpy_scalars(tmp_path):
    import numpy as np
    # a verifier answering with strings is refused, not read by truthiness ("False" -> True)
    mon = TTCMonitor([0], sample_fn=stub_sample_fn, verifier=lambda p, c: str(c == "ok"), n_samples=4,
                     target=0.5)
    with pytest.raises(TypeError, match="verifier result"):
        mon.evaluate(0.5, 1, 10.0)
    assert mon.checkpoints == []
    # numpy verdicts, numpy problem ids, numpy target / FLOPs are fine and the file reloads
    mon = TTCMonitor([0, 1], sample_fn=stub_sample_fn, verifier=lambda p, c: np.bool_(c == "ok"), n_samples=4,
                     target=np.float32(0.5), problem_ids=list(np.arange(2)))
    assert mon.evaluate(0.5, 1, np.float32(10.0)).stop
    out = tmp_path / "m.jsonl"
    assert mon.write(out) == 2 and list(load_samples(out)[0].problems) == [0, 1]
    # tuple ids cannot be written: refused before the existing file is touched
    mon = TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4, target=0.5,
                     problem_ids=[("gsm8k", 1)])
    mon.evaluate(0.5, 1, 10.0)
    with pytest.raises(TypeError, match="problem ids"):
        mon.write(out)
    assert len(load_samples(out)[0].problems) == 2
    cb = TTCEarlyStopping(TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4,
                                     target=0.5), eval_steps=np.int64(5), flops_per_step=1.0)
    assert cb.eval_steps == 5


# ---------------------------------------------------------------------------------------------
# state: save, reload (JSON), resume
# ---------------------------------------------------------------------------------------------
def _decision_view(d):
    return (d.step, d.train_flops, d.stop, d.reason, d.target, d.choice, d.accuracy, d.samples_drawn,
            d.eval_flops, d.earliest)


def test_monitor_state_round_trip_recomputes_decisions_and_continues_identically():
    import json
    qs = {1: 0.3, 2: 0.45, 3: 0.55, 4: 0.6, 5: 0.62, 6: 0.8}
    kw = dict(sample_fn=lambda q, p, n: stub_sample_fn(qs[q], p, n), verifier=stub_verifier, n_samples=20,
              k_max=8, strategies=["majority", "pass@k"], target="projection", planned_train_flops=1e15,
              min_checkpoints=3, infer_flops_per_sample=1e9, seed=4)
    mon = TTCMonitor(list(range(5)), **kw)
    for s in (1, 2, 3, 4):
        mon.evaluate(s, 10 * s, s * 1e14)
    sd = json.loads(json.dumps(mon.state_dict(), allow_nan=False))   # what a checkpoint holds
    back = TTCMonitor(list(range(5)), **kw)
    back.load_state_dict(sd)
    assert [_decision_view(d) for d in back.decisions] == [_decision_view(d) for d in mon.decisions]
    assert back.decisions[-1].projection is not None   # the projection keeps its earlier points
    assert [c.answers() for c in back.checkpoints] == [c.answers() for c in mon.checkpoints]
    assert back.samples_drawn == mon.samples_drawn == 4 * 5 * 20
    for s in (5, 6):
        assert _decision_view(back.evaluate(s, 10 * s, s * 1e14)) == _decision_view(mon.evaluate(s, 10 * s, s * 1e14))
    with pytest.raises(ValueError, match="already evaluated"):
        back.evaluate(1, 10, 7e14)
    # other settings: the decisions are recomputed under the new ones, with a warning naming them
    fixed = TTCMonitor(list(range(5)), **{**kw, "target": 0.5})
    with pytest.warns(RuntimeWarning, match="target='projection'"):
        fixed.load_state_dict(sd)
    direct = TTCMonitor(list(range(5)), **{**kw, "target": 0.5})
    for s in (1, 2, 3, 4):
        direct.evaluate(s, 10 * s, s * 1e14)
    assert [_decision_view(d) for d in fixed.decisions] == [_decision_view(d) for d in direct.decisions]
    assert [d.target for d in fixed.decisions] == [0.5] * 4


def test_monitor_state_refused_leaves_monitor_unchanged():
    import copy
    kw = dict(sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4, target=0.99)
    src = TTCMonitor([0, 1], **kw)
    src.evaluate(0.5, 1, 1.0)
    src.evaluate(0.75, 2, 2.0)
    good = src.state_dict()
    mon = TTCMonitor([0, 1], **kw)
    mon.evaluate(0.25, 7, 5.0)
    before = (list(mon.checkpoints), list(mon.decisions), mon.samples_drawn)

    def bad(path, value):
        sd = copy.deepcopy(good)
        obj = sd
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
        return sd
    cases = [
        ("must be a dict", TypeError, [1, 2]),
        ("version", ValueError, bad(["version"], 2)),
        ("problems=3", ValueError, bad(["settings", "problems"], 3)),
        ("n_samples=5", ValueError, bad(["settings", "n_samples"], 5)),
        ("other problem ids", ValueError, bad(["settings", "problem_ids"], [0, 9])),
        ("samples_drawn", ValueError, bad(["samples_drawn"], -1)),
        ("step must be", ValueError, bad(["checkpoints", 1, "step"], 1)),
        ("step must be", ValueError, bad(["checkpoints", 1, "step"], True)),
        ("decreases", ValueError, bad(["checkpoints", 1, "train_flops"], 0.5)),
        ("train_flops", ValueError, bad(["checkpoints", 0, "train_flops"], float("nan"))),
        (r"\[2\]\[4\]", ValueError, bad(["checkpoints", 0, "answers"], [["a"] * 4])),
        (r"\[2\]\[4\]", ValueError, bad(["checkpoints", 0, "correct"], [[True] * 3, [True] * 4])),
        ("strings", TypeError, bad(["checkpoints", 0, "answers"], [[1] * 4, ["a"] * 4])),
        ("verdict", TypeError, bad(["checkpoints", 0, "correct"], [["yes"] * 4, [True] * 4])),
        ("marked both", ValueError, bad(["checkpoints", 0, "correct"], [[True, False, True, True], [True] * 4])),
    ]
    for match, err, sd in cases:
        with pytest.raises(err, match=match):
            mon.load_state_dict(sd)
        assert (mon.checkpoints, mon.decisions, mon.samples_drawn) == before, match
    scored = TTCMonitor([0, 1], **kw, score_fn=lambda p, c: 0.0)
    with pytest.raises(ValueError, match="no scores"):
        scored.load_state_dict(good)


def test_flop_ledger_state_round_trip_and_refusals():
    import json
    from grades.demo.models import llama_config
    from grades.ttc import FlopLedger
    cfg = llama_config(vocab_size=15, size="tiny")
    led = FlopLedger(cfg, seq_len=8)
    led.add_step(64)
    led.add_step(64, frozen=["model.layers.0.mlp.gate_proj"])
    led.add_eval(5e6)
    sd = json.loads(json.dumps(led.state_dict()))
    back = FlopLedger(cfg, seq_len=8)
    back.load_state_dict(sd)
    assert back.summary() == led.summary() and back.history == led.history
    back.add_step(64)
    led.add_step(64)
    assert back.summary() == led.summary()
    fresh = FlopLedger(cfg, seq_len=8)
    for match, err, change in [("seq_len", ValueError, {"seq_len": 16}), ("train_flops", ValueError,
                               {"train_flops": float("nan")}), ("exceeds", ValueError, {"train_flops": 1e30}),
                               ("steps", TypeError, {"steps": 1.5}), ("history", ValueError, {"history": [[1]]}),
                               ("lacks", ValueError, None)]:
        bad = {k: v for k, v in sd.items() if k != "tokens"} if change is None else {**sd, **change}
        with pytest.raises(err, match=match):
            fresh.load_state_dict(bad)
        assert fresh.steps == 0 and fresh.train_flops == 0.0 and fresh.history == []


class _LedgerFiller:
    """A callback that accounts each optimizer step in a FlopLedger (before TTC's on_step_end)."""

    def __init__(self, ledger, tokens):
        from transformers import TrainerCallback

        class Filler(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kw):
                ledger.add_step(tokens)
        self.callback = Filler()


def test_callback_resumes_from_checkpoint_with_its_evaluations_and_ledger(addition, tmp_path):
    import json
    import shutil
    import warnings
    from transformers import Trainer, TrainingArguments
    from grades.demo.models import tiny_llama
    from grades.ttc import FlopLedger
    task = addition
    seq = task.prompt_len + task.answer_len + 1

    def run(out, resume=None, steps=30, **extra):
        model = tiny_llama(task.vocab_size, "tiny", seed=0)
        led = FlopLedger(model.config, seq_len=seq)
        mon = TTCMonitor(task.val[:8], task=task, n_samples=4, strategies=["pass@k"], target="projection",
                         planned_train_flops=1e12, min_checkpoints=2, infer_flops_per_sample=1e6, seed=0)
        cb = TTCEarlyStopping(mon, eval_steps=4, ledger=led)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, report_to=[], save_strategy="steps", save_steps=10,
                                 logging_strategy="no", remove_unused_columns=False, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0, **extra)
        tr = Trainer(model=model, args=args, train_dataset=[{"ex": e} for e in task.train],
                     data_collator=lambda feats: task.train_batch([f["ex"] for f in feats]),
                     callbacks=[_LedgerFiller(led, 16 * seq).callback, cb])
        tr.train(resume_from_checkpoint=resume)
        return cb, led

    cb1, led1 = run(tmp_path / "a")
    assert [d.step for d in cb1.monitor.decisions] == [4, 8, 12, 16, 20, 24, 28]
    saved = json.loads((tmp_path / "a" / "checkpoint-10" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"][TTCEarlyStopping.STATE_KEY]
    # saved at step 10, between evaluations: the ledger's totals are those of step 10
    assert [c["step"] for c in entry["monitor"]["checkpoints"]] == [4, 8] and entry["ledger"]["steps"] == 10
    # resumed elsewhere, from a copy of checkpoint-10 (and again with the Trainer's own callback
    # restoring switched on, which cannot rebuild this callback and must leave it alone)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "a" / "checkpoint-10", moved)
    for extra in ({}, {"restore_callback_states_from_checkpoint": True}):
        cb2, led2 = run(tmp_path / "b", resume=str(moved), **extra)
        assert [d.step for d in cb2.monitor.decisions] == [4, 8, 12, 16, 20, 24, 28]
        assert led2.steps == 30 and led2.train_flops == pytest.approx(led1.train_flops, rel=1e-12)
        assert led2.eval_flops == pytest.approx(led1.eval_flops)
        assert [d.train_flops for d in cb2.monitor.decisions] == pytest.approx(
            [d.train_flops for d in cb1.monitor.decisions], rel=1e-12)
        # the restored evaluations are the saved ones; the projection of the first one after the
        # resume fits the points of before it
        assert [_decision_view(d) for d in cb2.monitor.decisions[:2]] == \
            [_decision_view(d) for d in cb1.monitor.decisions[:2]]
        assert cb2.monitor.decisions[2].projection is not None
        assert cb2.monitor.decisions[2].projection.n_points == 3
    # a checkpoint written without this callback: the resume says so
    ts = moved / "trainer_state.json"
    d = json.loads(ts.read_text())
    del d["stateful_callbacks"][TTCEarlyStopping.STATE_KEY]
    ts.write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.warns(RuntimeWarning, match="holds no TTC state"):
            run(tmp_path / "c", resume=str(moved), steps=12)
