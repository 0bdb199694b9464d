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
                     min_checkpoints=4, max_extrapolation=1.0)
    decisions = []
    for i, f in enumerate([1e14, 2e14, 3e14, 4e14, 5e14, 6e14]):
        decisions.append(mon.evaluate(curve(f), step=i + 1, train_flops=f))
        if decisions[-1].stop:
            break
    assert all("waits" in d.reason for d in decisions[:3])
    assert all(d.target is None and not d.stop for d in decisions[:3])
    last = decisions[-1]
    assert last.stop, [d.reason for d in decisions]
    # the projection at 1e15 is close to the curve's value there (0.8 - 0.7 e^-3.3 = 0.774)
    assert last.target == pytest.approx(curve(1e15), abs=0.05)
    c = last.choice
    assert c.strategy == "majority@k" and c.k <= 8 and c.accuracy >= last.target
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


def test_monitor_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        TTCMonitor([0], n_samples=4)
    with pytest.raises(ValueError):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, n_samples=4, k_max=5)
    with pytest.raises(ValueError, match="planned_train_flops"):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target="projection")
    with pytest.raises(ValueError, match="infer_flops_per_sample"):
        TTCMonitor([0], sample_fn=stub_sample_fn, verifier=stub_verifier, target=0.5, expected_queries=10)
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


# ---------------------------------------------------------------------------------------------
# a tiny Llama trained on the embedded addition task
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def addition():
    from grades.tasks import AdditionTask
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead on a shared CPU
    yield AdditionTask(digits=1, seed=0, n_val=16, n_test=16)
    torch.set_num_threads(threads)


def test_monitor_in_plain_loop_samples_verifies_records_stops(addition, tmp_path):
    from grades.models import tiny_llama
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


def test_callback_stops_trainer(addition, tmp_path):
    from transformers import Trainer, TrainingArguments
    from grades.models import tiny_llama
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
