"""GradES under DeepSpeed ZeRO-1/2 with ZeroAdamW as the client optimizer, two gloo ranks on CPU.

A plain DeepSpeed loop (stages 1 and 2) matches a one-process run over the global batch, frozen
parameters stay bitwise unchanged after their freeze and both ranks take the same decisions;
the transformers Trainer with a DeepSpeed config (``optimizer_cls_and_kwargs``) freezes the same
way; ZeRO-3 and a plain torch AdamW under ZeRO-2 are refused when GradES is built.
"""
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import torch

from dist_util import run_workers, unchanged_after_freeze
from test_megatron import CFG, LR, STEPS, WD, Net, batch, flat_params, reference_run

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9}


def _plain(stage: int, rank: int) -> dict:
    import deepspeed
    from grades import GradES, GradESConfig
    from grades.integrations.deepspeed import ZeroAdamW
    from grades.integrations.distributed import decisions_agree
    m = Net()
    eng, *_ = deepspeed.initialize(model=m, optimizer=ZeroAdamW(m.parameters(), lr=LR, weight_decay=WD),
                                   config=_ds_config(stage))
    gs = GradES(m, eng.optimizer, GradESConfig(**CFG))
    assert gs.frozen_aware
    snaps = []
    for s in range(STEPS):
        x, y = batch(s, rank, 2)
        eng.backward(((eng(x) - y) ** 2).mean())
        eng.step()
        gs.step()
        snaps.append(flat_params(m))
    return {"params": snaps[-1].tolist(), "freeze_step": gs.state_dict()["freeze_step"],
            "stats": [h["stat"] for h in gs.history], "agree": decisions_agree(gs),
            "unchanged": unchanged_after_freeze(m, gs, snaps)}


def _checkpoint(rank: int, out: str) -> dict:
    """ZeRO-2 with ZeroAdamW through DeepSpeed's own checkpointing: the moments come back."""
    import deepspeed
    from grades.integrations.deepspeed import ZeroAdamW

    def engine():
        m = Net()
        return deepspeed.initialize(model=m, optimizer=ZeroAdamW(m.parameters(), lr=LR, weight_decay=WD),
                                    config=_ds_config(2))[0]
    eng = engine()
    for s in range(2):
        x, y = batch(s, rank, 2)
        eng.backward(((eng(x) - y) ** 2).mean())
        eng.step()
    eng.save_checkpoint(os.path.join(out, "ckpt"), tag="t")
    back = engine()
    back.load_checkpoint(os.path.join(out, "ckpt"), tag="t")
    a, b = eng.optimizer.optimizer, back.optimizer.optimizer
    pa, pb = a.param_groups[0]["params"][0], b.param_groups[0]["params"][0]
    return {"moments_equal": all(torch.equal(a.state[pa][k], b.state[pb][k]) for k in ("exp_avg", "exp_avg_sq")),
            "step": [float(a.state[pa]["step"]), float(b.state[pb]["step"])],
            "params_equal": bool(torch.equal(pa, pb))}


def _refusal(stage: int, opt_cls) -> str:
    import deepspeed
    from grades import GradES, GradESConfig
    m = Net()
    eng, *_ = deepspeed.initialize(model=m, optimizer=opt_cls(m.parameters(), lr=LR), config=_ds_config(stage))
    try:
        GradES(m, eng.optimizer, GradESConfig(**CFG))
    except ValueError as e:
        return str(e)
    return ""


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def _trainer(rank: int, out: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from grades.integrations.deepspeed import ZeroAdamW
    from grades.integrations.distributed import decisions_agree
    from grades.integrations.transformers import GradESCallback
    data = []
    for s in range(STEPS):
        x, y = batch(s, None, 2)
        data += [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]
    cfg = _ds_config(2)
    cfg.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=8, max_steps=STEPS,
                             learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", warmup_steps=0,
                             max_grad_norm=0.0, deepspeed=cfg, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                             ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    model = _Regression()
    cb = GradESCallback(CFG)
    snaps = []

    class Snap(TrainerCallback):
        def on_step_end(self, *a, **k):
            snaps.append(flat_params(model))

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Snap()],
                      optimizer_cls_and_kwargs=(ZeroAdamW, {"lr": LR, "weight_decay": WD}))
    trainer.train()
    gs = cb.gs
    return {"params": snaps[-1].tolist(), "freeze_step": gs.state_dict()["freeze_step"],
            "agree": decisions_agree(gs), "frozen_aware": gs.frozen_aware,
            "unchanged": unchanged_after_freeze(model, gs, snaps)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from grades.integrations.deepspeed import ZeroAdamW
    deepspeed.init_distributed(dist_backend="gloo")
    res = {}
    for stage in (1, 2):
        res[f"zero{stage}"] = _plain(stage, rank)
    res["checkpoint"] = _checkpoint(rank, out)
    res["torch_adamw_zero2"] = _refusal(2, torch.optim.AdamW)
    try:
        res["zero3"] = _refusal(3, ZeroAdamW)
    except Exception as e:  # noqa: BLE001  (an engine that cannot even be built here is reported)
        res["zero3_error"] = f"{type(e).__name__}: {e}"
    try:
        res["trainer"] = _trainer(rank, out)
    except Exception as e:  # noqa: BLE001
        res["trainer_error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("deepspeed"))
    return run_workers(_worker, 2, out)


@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_one_process_and_ranks_agree(results, stage):
    r0, r1 = results[0][f"zero{stage}"], results[1][f"zero{stage}"]
    ref, gs_ref = reference_run(world=2)
    for r in (r0, r1):
        np.testing.assert_allclose(r["params"], flat_params(ref), rtol=1e-5, atol=1e-6)
        assert r["freeze_step"] == gs_ref.state_dict()["freeze_step"]
        assert r["agree"] and r["unchanged"] and all(r["unchanged"])
    assert r0["params"] == r1["params"] and r0["stats"] == r1["stats"]
    assert any(f > 0 for f in r0["freeze_step"])


@pytest.mark.distributed
@needs_deepspeed
def test_zero_adamw_state_survives_a_deepspeed_checkpoint(results):
    for r in results:
        c = r["checkpoint"]
        assert c["moments_equal"] and c["params_equal"] and c["step"] == [2.0, 2.0]


@pytest.mark.distributed
@needs_deepspeed
def test_unsupported_setups_are_refused_when_gradES_is_built(results):
    msg = results[0]["torch_adamw_zero2"]
    assert "ZeroAdamW" in msg and "AdamW" in msg and "param.grad is None" in msg
    if "zero3" not in results[0]:
        pytest.skip(f"a ZeRO-3 engine could not be built on this machine: {results[0]['zero3_error']}")
    assert "stage 3" in results[0]["zero3"]


@pytest.mark.distributed
@needs_deepspeed
def test_trainer_with_deepspeed_config_freezes_and_ranks_agree(results):
    if "trainer" not in results[0]:
        pytest.fail(results[0]["trainer_error"])
    r0, r1 = results[0]["trainer"], results[1]["trainer"]
    assert r0["frozen_aware"] and r0["agree"] and r1["agree"]
    assert r0["freeze_step"] == r1["freeze_step"] and any(f > 0 for f in r0["freeze_step"])
    assert r0["params"] == r1["params"]
    assert r0["unchanged"] and all(r0["unchanged"]) and all(r1["unchanged"])


def test_zero_adamw_outside_zero_stages_1_and_2_is_refused():
    """Handed the model's own parameters (no ZeRO, or stage 0), ZeroAdamW says what to use instead,
    before anything changes."""
    from grades.integrations.deepspeed import ZeroAdamW
    m = Net()
    opt = ZeroAdamW(m.parameters(), lr=LR)
    x, y = batch(0, None, 1)
    ((m(x) - y) ** 2).mean().backward()
    before = flat_params(m)
    with pytest.raises(ValueError, match="FrozenAwareAdamW"):
        opt.step()
    assert np.array_equal(before, flat_params(m))
