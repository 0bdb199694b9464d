"""GradES under the transformers Trainer (own optimizer, FrozenAwareAdamW, PEFT LoRA), on GPT-2 and
BERT configs, and the Megatron-style flat main_grad path."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from grades import GradES, GradESConfig  # noqa: E402
from grades.integrations.transformers import HISTORY_FILE, STATE_FILE, GradESCallback  # noqa: E402
from grades.models import tiny_llama  # noqa: E402

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


def test_trainer_freezes_after_grace_and_frozen_params_stop_changing(tmp_path):
    model = tiny_llama(VOCAB)
    cfg = GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=3, patience=1, stop_ratio=None)
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
    assert sorted(steps) == sorted(att) and set(steps.values()) == {5}  # checks at 4, 5; patience 1
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


def test_trainer_stops_when_all_frozen_with_accumulation_and_clipping(tmp_path):
    model = tiny_llama(VOCAB)
    cb = GradESCallback(GradESConfig(tau=1e9, alpha=0.25, patience=0))
    tr = Trainer(model=model, args=args(tmp_path, 20, gradient_accumulation_steps=2, max_grad_norm=0.5),
                 train_dataset=RandomLM(), callbacks=[cb])
    tr.train()
    assert cb.gs.grace == 5                      # alpha x max_steps
    assert cb.gs.should_stop and cb.gs.stopped_at == 6
    assert tr.state.global_step == 6
    assert all(not p.requires_grad for c in cb.gs.components for p in c.params)


def test_trainer_statistic_is_of_accumulated_clipped_gradient(tmp_path):
    model = tiny_llama(VOCAB)
    seen = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            w = model.model.layers[0].mlp.down_proj.weight
            seen[state.global_step + 1] = float(w.grad.double().abs().sum())

    cb = GradESCallback(GradESConfig(tau=1e-30, grace_steps=0, history_every=1))
    tr = Trainer(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=2, max_grad_norm=0.1),
                 train_dataset=RandomLM(), callbacks=[Grab(), cb])
    tr.train()
    i = [c.name for c in cb.gs.components].index("model.layers.0.mlp.down_proj")
    got = {h["step"]: h["stat"][i] for h in cb.gs.history}
    for s in (1, 2, 3):
        assert got[s] == pytest.approx(seen[s], rel=1e-5)


def test_trainer_resume_keeps_frozen_set(tmp_path):
    cfg = GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=0, stop_ratio=None)

    def make(cb, steps):
        return Trainer(model=tiny_llama(VOCAB), args=args(tmp_path, steps, save_strategy="steps", save_steps=4),
                       train_dataset=RandomLM(), callbacks=[cb])

    cb1 = GradESCallback(cfg)
    make(cb1, 6).train()
    assert os.path.isfile(tmp_path / "checkpoint-4" / STATE_FILE)
    cb2 = GradESCallback(cfg)
    tr2 = make(cb2, 6)
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert cb2.gs.frozen_components == cb1.gs.frozen_components
    assert cb2.gs.history_dict()["freeze_steps"] == cb1.gs.history_dict()["freeze_steps"]
    assert cb2.gs.step_count == 6
    q = tr2.model.model.layers[1].self_attn.v_proj.weight
    assert not q.requires_grad


def test_trainer_with_frozen_aware_adamw(tmp_path):
    optim = pytest.importorskip("grades.optim")
    model = tiny_llama(VOCAB)
    opt = optim.FrozenAwareAdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cb = GradESCallback(GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, stop_ratio=None))
    tr = Trainer(model=model, args=args(tmp_path, 5), train_dataset=RandomLM(), callbacks=[cb],
                 optimizers=(opt, sched))
    w = model.model.layers[0].self_attn.k_proj.weight
    snap = {}

    class S(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snap[state.global_step] = w.detach().clone()
    tr.add_callback(S())
    tr.train()
    assert cb.gs.frozen_aware
    assert set(cb.gs.history_dict()["freeze_steps"].values()) == {3}
    assert torch.equal(snap[3], snap[5]) and not torch.equal(snap[2], snap[3])
    assert bool(opt.frozen[opt.param_index(w)])


def test_trainer_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(VOCAB)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    base_w = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cb = GradESCallback(GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, stop_ratio=None))
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
def test_other_families_plain_loop(family):
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gs = GradES(model, opt, GradESConfig(tau=1e9, grace_steps=2))
    assert {c.name: c.type for c in gs.components if ".0." in c.name} == expect
    assert len(gs.components) == 2 * len(expect)
    ids = torch.randint(3, VOCAB, (4, 8))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        gs.step()
        opt.zero_grad()
        if gs.should_stop:
            break
    assert gs.stopped_at == 3


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
    gs = GradES(model, None, GradESConfig(tau=1e9, grace_steps=1, stop_ratio=None, max_frozen_ratio=0.5),
                stats_source=FlatGradSource.from_model(model, buf))
    src = gs.source
    assert len(src.table) == len(gs.components)
    gs_ref = GradES(ref, None, GradESConfig(tau=1e9, grace_steps=1, stop_ratio=None, max_frozen_ratio=0.5))
    gs.step()
    gs_ref.step()
    np.testing.assert_allclose(gs.last_stats, gs_ref.last_stats, rtol=1e-6)
    gs.step()
    assert gs.frozen_fraction == 0.5
    frozen = [c for c in gs.components if c.name in gs.frozen_components]
    buf.zero_()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(float(c.params[0].main_grad.abs().sum()) == 0 for c in frozen)
