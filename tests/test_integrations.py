"""GradES under the transformers Trainer (own optimizer, FrozenAwareAdamW, PEFT LoRA), on GPT-2 and
BERT configs, and the Megatron-style flat main_grad path."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from grades import GradES, GradESConfig  # noqa: E402
from grades.components import discover_components  # noqa: E402
from grades.integrations.transformers import HISTORY_FILE, GradESCallback  # noqa: E402
from grades.demo.models import tiny_llama  # noqa: E402

VOCAB = 16


class RandomLM(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, max_steps, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


class Snap(transformers.TrainerCallback):
    """Records every parameter after each optimizer step, and the logs."""

    def __init__(self, names):
        self.names, self.snaps, self.logs = names, {}, []

    def on_step_end(self, args, state, control, model=None, **kw):
        ps = dict(model.named_parameters())
        self.snaps[state.global_step] = {n: ps[n].detach().clone() for n in self.names}

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


class Scale(transformers.TrainerCallback):
    """Multiplies every gradient by ``factor`` from optimizer step ``at`` on (after clipping, before
    the optimizer step): a known drop of every component's statistic at a known step."""

    def __init__(self, at: int, factor: float = 1e-3):
        self.at, self.factor = at, factor

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step + 1 >= self.at:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.factor)


def test_trainer_freezes_after_grace_and_frozen_params_stop_changing(tmp_path):
    model = tiny_llama(VOCAB)
    cfg = GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=3, patience=2, ema=None, stop_ratio=None)
    cb = GradESCallback(cfg)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    snap = Snap(names)
    tr = Trainer(model=model, args=args(tmp_path, 8), train_dataset=RandomLM(), callbacks=[cb, snap])
    tr.train()
    gs = cb.gs
    assert len(gs.components) == 14
    assert {c.type for c in gs.components} == {"attention", "mlp"}
    steps = gs.history_dict()["freeze_steps"]
    att = [c.name for c in gs.components if c.type == "attention"]
    assert sorted(steps) == sorted(att) and set(steps.values()) == {5}  # checks at 4, 5; patience 2
    q, up = snap.snaps, names
    assert not torch.equal(q[4][up[0]], q[5][up[0]])                  # still trained at step 5
    for s in (6, 7, 8):
        assert torch.equal(q[5][up[0]], q[s][up[0]])                   # frozen from step 6 on
        assert not torch.equal(q[s - 1][up[1]], q[s][up[1]])           # MLP keeps training
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert tr.state.global_step == 8
    logged = [lg for lg in snap.logs if "grades/frozen_fraction" in lg]
    assert logged and logged[-1]["grades/frozen_fraction"] == pytest.approx(8 / 14)
    assert "grades/mlp_stat" in logged[-1] and "grades/attention_stat" in logged[0]
    hist = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert hist["freeze_steps"] == steps and hist["samples"]


def test_grace_period_longer_than_the_run_is_refused_before_training(tmp_path):
    model = tiny_llama(VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model=model, args=args(tmp_path, 5), train_dataset=RandomLM(),
                 callbacks=[GradESCallback(GradESConfig(tau=1.0, grace_steps=5))])
    with pytest.raises(ValueError, match="grace_steps=5 leaves no step"):
        tr.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_metrics_reach_reporters_listed_before_the_callback(tmp_path):
    """The Trainer runs report_to callbacks (TensorBoard, W&B) before user callbacks: a reporter
    listed first must still receive the grades/* metrics, and so must state.log_history."""
    model = tiny_llama(VOCAB)
    reporter = Snap([])
    cb = GradESCallback(GradESConfig(tau=1e-30, grace_steps=1))
    tr = Trainer(model=model, args=args(tmp_path, 3), train_dataset=RandomLM(), callbacks=[reporter, cb])
    assert tr.callback_handler.callbacks[0] is cb
    tr.train()
    step_logs = [lg for lg in reporter.logs if "loss" in lg]
    assert len(step_logs) == 3 and all("grades/frozen_fraction" in lg and "grades/mlp_stat" in lg for lg in step_logs)
    hist = [h for h in tr.state.log_history if "loss" in h]
    assert len(hist) == 3 and all("grades/attention_stat" in h for h in hist)
    cb2 = GradESCallback(GradESConfig(tau=1e-30, grace_steps=1))
    tr.add_callback(cb2)
    assert cb2.attach(tr) is cb2 and tr.callback_handler.callbacks[0] is cb2


def test_trainer_freezes_when_statistic_crosses_tau_with_accumulation_and_clipping(tmp_path):
    """Automatic threshold under gradient accumulation and clipping: every gradient drops 1000x
    from step 7 on (at this learning rate the statistics otherwise stay above half their grace
    level); with patience 2 every component freezes at step 8, not before, and training stops."""
    model = tiny_llama(VOCAB)
    cb = GradESCallback(GradESConfig(rel_tau=0.5, ema=None, patience=2, alpha=0.2))
    snap = Snap(["model.layers.0.mlp.down_proj.weight"])
    tr = Trainer(model=model, args=args(tmp_path, 20, gradient_accumulation_steps=2, max_grad_norm=0.5,
                                        learning_rate=3e-4),
                 train_dataset=RandomLM(), callbacks=[cb, Scale(at=7), snap])
    tr.train()
    gs = cb.gs
    assert gs.grace == 4                                     # alpha x max_steps
    assert set(gs.history_dict()["freeze_steps"].values()) == {8}
    assert [h["frozen"] for h in gs.history if h["step"] < 8] == [0] * 7
    assert gs.should_stop and gs.stopped_at == 8 and tr.state.global_step == 8
    assert all(not p.requires_grad for c in gs.components for p in c.params)
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(snap.snaps[7][w], snap.snaps[8][w])  # the step-8 update still happened


def test_trainer_statistic_is_of_accumulated_unclipped_gradient(tmp_path):
    """With learning rate 0 the gradients do not depend on clipping, so the statistics of a run
    that clips hard must equal those of a run that does not clip: both the accumulated,
    unclipped gradient (which the unclipped run's on_pre_optimizer_step sees)."""
    got, seen = {}, {}
    for clip in (0.0, 1e-3):
        seen[clip] = {}

        class Grab(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                g = model.model.layers[0].mlp.down_proj.weight.grad
                seen[clip][state.global_step + 1] = float(g.double().abs().sum())

        cb = GradESCallback(GradESConfig(tau=1e-30, grace_steps=0, ema=None))
        tr = Trainer(model=tiny_llama(VOCAB), args=args(tmp_path, 3, gradient_accumulation_steps=2, max_grad_norm=clip,
                                                        learning_rate=0.0),
                     train_dataset=RandomLM(), callbacks=[Grab(), cb])
        tr.train()
        i = [c.name for c in cb.gs.components].index("model.layers.0.mlp.down_proj")
        got[clip] = {h["step"]: h["stat"][i] for h in cb.gs.history}
    for s in (1, 2, 3):
        assert got[0.0][s] == pytest.approx(seen[0.0][s], rel=1e-6)   # the accumulated gradient
        assert got[1e-3][s] == pytest.approx(got[0.0][s], rel=1e-5)   # clipping divided out
        assert seen[1e-3][s] < 0.1 * got[1e-3][s]                      # the gradient really was clipped


RESUME_CFG = GradESConfig(rel_tau=0.5, ema=None, patience=3, grace_steps=4, stop_ratio=None)


def resume_trainer(out, steps=14, **kw):
    """Every gradient drops 1000x from step 7: below threshold at checks 7, 8, 9 -> frozen at 9."""
    cb = GradESCallback(RESUME_CFG)
    tr = Trainer(model=tiny_llama(VOCAB), args=args(out, steps, learning_rate=3e-4, save_strategy="steps",
                                                    save_steps=8, **kw),
                 train_dataset=RandomLM(), callbacks=[cb, Scale(at=7)])
    return tr, cb


def test_trainer_resume_from_checkpoint_elsewhere_keeps_frozen_set_and_counters(tmp_path):
    """The state travels inside the checkpoint (trainer_state.json), so a checkpoint copied out of
    output_dir resumes with the patience counters it had: saved at step 8 with two checks below
    threshold, the third (step 9) freezes everything, exactly as in the uninterrupted run."""
    import shutil
    tr1, cb1 = resume_trainer(tmp_path / "a")
    tr1.train()
    want = cb1.gs.history_dict()["freeze_steps"]
    assert set(want.values()) == {9} and len(want) == 14
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "a" / "checkpoint-8", moved)
    saved = json.loads((moved / "trainer_state.json").read_text())["stateful_callbacks"]["GradESCallback"]
    assert saved["attributes"]["grades_state"]["counter"] == [2] * 14
    tr2, cb2 = resume_trainer(tmp_path / "b")
    tr2.train(resume_from_checkpoint=str(moved))
    assert cb2.gs.history_dict()["freeze_steps"] == want
    assert cb2.gs.step_count == 14 and cb2.gs.frozen_components == cb1.gs.frozen_components
    assert not tr2.model.model.layers[1].self_attn.v_proj.weight.requires_grad


def test_trainer_resume_in_the_same_process_unfreezes_what_froze_later(tmp_path):
    """The same Trainer resumed from checkpoint-8 (before the freezes at 9) after its run froze
    everything: the callback's new GradES gives the parameters their requires_grad back, and the
    rerun freezes at the same steps as the first."""
    tr, cb = resume_trainer(tmp_path / "a")
    tr.train()
    want = cb.gs.history_dict()["freeze_steps"]
    assert set(want.values()) == {9} and len(want) == 14
    seen = {}

    class AtStart(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.setdefault("frozen_at_first_step", sum(not p.requires_grad for p in model.parameters()))
    tr.add_callback(AtStart())
    seen["frozen_before"] = sum(not p.requires_grad for p in tr.model.parameters())
    tr.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert seen == {"frozen_before": 14, "frozen_at_first_step": 0}
    assert cb.gs.history_dict()["freeze_steps"] == want and cb.gs.step_count == 14
    seen.clear()
    tr.train()                     # a fresh run on the same model: nothing frozen at its start
    assert seen == {"frozen_at_first_step": 0}


def test_trainer_small_max_steps_and_numpy_config_values(tmp_path):
    """The default configuration (alpha=0.3) in a run of 2 steps has one grace step; NumPy-typed
    settings (from a sweep grid) still give checkpoints the Trainer can write as JSON."""
    tr = Trainer(model=tiny_llama(VOCAB), args=args(tmp_path / "a", 2), train_dataset=RandomLM(),
                 callbacks=[cb := GradESCallback()])
    tr.train()
    assert cb.gs.grace == 1 and cb.gs.step_count == 2
    cfg = GradESConfig(rel_tau=np.float64(0.5), patience=np.int64(2), grace_steps=np.int64(2))
    tr = Trainer(model=tiny_llama(VOCAB), args=args(tmp_path / "b", 3, save_strategy="steps", save_steps=3),
                 train_dataset=RandomLM(), callbacks=[GradESCallback(cfg)])
    tr.train()
    saved = json.loads((tmp_path / "b" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GradESCallback"]["args"]["config"]["patience"] == 2


def test_trainer_resume_without_saved_state_warns_and_restarts_the_grace_period(tmp_path):
    tr1, _ = resume_trainer(tmp_path / "a", steps=8)
    tr1.train()
    ts = tmp_path / "a" / "checkpoint-8" / "trainer_state.json"
    d = json.loads(ts.read_text())
    del d["stateful_callbacks"]["GradESCallback"]
    ts.write_text(json.dumps(d))
    tr2, cb2 = resume_trainer(tmp_path / "b", steps=10)
    with pytest.warns(RuntimeWarning, match="no GradES state"):
        tr2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert cb2.gs.step_count == 10 and cb2.gs.grace == 8 + 4   # levels are measured anew
    assert cb2.gs.frozen_fraction == 0.0


def test_trainer_with_frozen_aware_adamw(tmp_path):
    optim = pytest.importorskip("grades.optim")
    model = tiny_llama(VOCAB)
    opt = optim.FrozenAwareAdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cb = GradESCallback(GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=1, stop_ratio=None))
    tr = Trainer(model=model, args=args(tmp_path, 5), train_dataset=RandomLM(), callbacks=[cb],
                 optimizers=(opt, sched))
    w = model.model.layers[0].self_attn.k_proj.weight
    snap = {}

    class S(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snap[state.global_step] = w.detach().clone()
    tr.add_callback(S())
    norms = []
    use = opt.use_total_norm
    opt.use_total_norm = lambda n: (norms.append(n), use(n))[1]
    tr.train()
    assert cb.gs.frozen_aware
    # the Trainer's total gradient norm served as each step's non-finite check (no detection pass)
    assert len(norms) == 5 and all(isinstance(n, torch.Tensor) and torch.isfinite(n) for n in norms)
    assert int(opt.skipped_steps) == 0
    assert set(cb.gs.history_dict()["freeze_steps"].values()) == {3}
    assert torch.equal(snap[3], snap[5]) and not torch.equal(snap[2], snap[3])
    assert bool(opt.frozen[opt.param_index(w)])


def test_trainer_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(VOCAB)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cb = GradESCallback(GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=1, stop_ratio=None))
    tr = Trainer(model=model, args=args(tmp_path, 5), train_dataset=RandomLM(), callbacks=[cb])
    tr.train()
    comps = cb.gs.components
    assert len(comps) == 6 and all(len(c.params) == 2 for c in comps)
    assert all("lora_A" in c.param_names[0] and "lora_B" in c.param_names[1] for c in comps)
    assert {c.name.rsplit(".", 1)[-1] for c in comps} == {"q_proj", "v_proj", "up_proj"}
    frozen = set(cb.gs.frozen_components)
    assert frozen == {c.name for c in comps if c.type == "attention"}
    for c in comps:
        assert all(p.requires_grad == (c.name not in frozen) for p in c.params)
    for n, p in model.named_parameters():
        if n in base_w:
            assert torch.equal(p, base_w[n])


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_other_families_under_trainer(tmp_path, family):
    """GPT-2 and BERT trained a few dozen steps under Trainer: components found, nothing frozen
    while the statistics stay near their grace level, all frozen two checks after every gradient
    drops 1000x (step 24), and training stops there."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=1, eos_token_id=2))
        expect = {"transformer.h.0.attn.c_attn": "attention", "transformer.h.0.attn.c_proj": "attention",
                  "transformer.h.0.mlp.c_fc": "mlp", "transformer.h.0.mlp.c_proj": "mlp"}
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=16, pad_token_id=0))
        p = "bert.encoder.layer.0."
        expect = {p + "attention.self.query": "attention", p + "attention.self.key": "attention",
                  p + "attention.self.value": "attention", p + "attention.output.dense": "attention",
                  p + "intermediate.dense": "mlp", p + "output.dense": "mlp"}
    cb = GradESCallback(GradESConfig(rel_tau=0.5, ema=None, patience=2, grace_steps=8))
    tr = Trainer(model=model, args=args(tmp_path, 36, learning_rate=1e-4), train_dataset=RandomLM(),
                 callbacks=[cb, Scale(at=24)])
    tr.train()
    gs = cb.gs
    assert {c.name: c.type for c in gs.components if ".0." in c.name} == expect
    assert len(gs.components) == 2 * len(expect)
    assert set(gs.history_dict()["freeze_steps"].values()) == {25}
    assert gs.stopped_at == 25 and tr.state.global_step == 25


def test_discovery_of_vision_towers_and_gpt_neox():
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1))
    found = {c.name: c.type for c in discover_components(transformers.Qwen2VLForConditionalGeneration(cfg))}
    v = "model.visual.blocks.0."
    assert {k: t for k, t in found.items() if k.startswith(v)} == {
        v + "attn.qkv": "attention", v + "attn.proj": "attention", v + "mlp.fc1": "mlp", v + "mlp.fc2": "mlp"}
    assert len(found) == 4 + 7                               # vision block + one language layer
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    p = "gpt_neox.layers.0."
    assert {c.name: c.type for c in discover_components(neox)} == {
        p + "attention.query_key_value": "attention", p + "attention.dense": "attention",
        p + "mlp.dense_h_to_4h": "mlp", p + "mlp.dense_4h_to_h": "mlp"}


def test_megatron_flat_main_grad_one_call():
    from grades.integrations.megatron import FlatGradSource, attach_main_grad_buffer
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    ref = tiny_llama(VOCAB)
    buf = attach_main_grad_buffer(model)
    ids = torch.randint(3, VOCAB, (4, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is None and p.main_grad.data_ptr() >= buf.data_ptr()
        torch.testing.assert_close(p.main_grad, dict(ref.named_parameters())[n].grad)
    gs = GradES(model, None, GradESConfig(tau=1e9, grace_steps=1, patience=1, stop_ratio=None, max_frozen_ratio=0.5),
                stats_source=FlatGradSource.from_model(model, buf))
    src = gs.source
    assert len(src.table) == len(gs.components)
    gs_ref = GradES(ref, None, GradESConfig(tau=1e9, grace_steps=1, patience=1, stop_ratio=None, max_frozen_ratio=0.5))
    gs.step()
    gs_ref.step()
    np.testing.assert_allclose(gs.last_stats, gs_ref.last_stats, rtol=1e-6)
    gs.step()
    assert gs.frozen_fraction == 0.5
    frozen = [c for c in gs.components if c.name in gs.frozen_components]
    buf.zero_()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(float(c.params[0].main_grad.abs().sum()) == 0 for c in frozen)


def test_trainer_stop_is_announced_and_checkpointed(tmp_path, capsys):
    """When GradES stops the Trainer it says so in one line and the stopped model is saved,
    although the save schedule would not have saved at that step."""
    cfg = GradESConfig(tau=1e9, grace_steps=2, patience=1, ema=None)
    tr = Trainer(model=tiny_llama(VOCAB), args=args(tmp_path, 12, save_strategy="steps", save_steps=100),
                 train_dataset=RandomLM(), callbacks=[GradESCallback(cfg)])
    tr.train()
    stop = tr.state.global_step
    assert stop < 12
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("GradES:")]
    assert lines == [f"GradES: all 14 matrices frozen at step {stop}; stopping "
                     f"(checkpoint-{stop} saved in {tmp_path})"]
    assert (tmp_path / f"checkpoint-{stop}" / "trainer_state.json").is_file()
