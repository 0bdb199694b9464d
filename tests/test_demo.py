"""``grades demo``: the quick configuration end to end, its report directory, and bad flags."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from grades.demo import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("grad_stats", "frozen_fraction", "loss", "ttc_accuracy")


def _check_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert w > 100 and h > 100


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--quick", "--out", str(out), "--no-progress", "--seed", "0"])
    assert rc == 0
    return out, buf.getvalue()


def test_quick_report_has_every_figure(quick_report):
    out, printed = quick_report
    rep = json.loads((out / "report.json").read_text())
    for key in ("config", "model", "task", "runs", "speedup", "accuracy_delta", "grades", "ttc", "files",
                "environment", "table"):
        assert key in rep, key
    assert rep["config"]["quick"] is True
    assert [rep["runs"][r]["optimizer"] for r in "ABP"] == [
        "grades.FrozenAwareAdamW (GradES off)", "grades.FrozenAwareAdamW + grades.GradES", "torch.optim.AdamW"]
    for run in ("A", "B", "P"):
        r = rep["runs"][run]
        for key in ("wall_time_s", "optimizer_steps", "train_flops", "test_accuracy", "checkpoints"):
            assert key in r, (run, key)
        assert r["wall_time_s"] > 0 and r["train_flops"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
    a, b = rep["runs"]["A"], rep["runs"]["B"]
    assert a["optimizer_steps"] == rep["config"]["steps"]
    assert 1 <= b["optimizer_steps"] <= a["optimizer_steps"]
    assert b["stopped_early"] == (b["frozen_components"] == b["num_components"])
    # A and B are one run until B's first freeze: bit-identical losses through that step
    assert b["first_freeze"] is not None and rep["identical_steps"] >= b["first_freeze"]
    # P (torch AdamW) differs from A in the last bits only
    assert rep["runs"]["P"]["final_loss"] == pytest.approx(a["final_loss"], rel=1e-3)
    assert rep["premise"]["baseline_converged"] == (a["test_accuracy"] >= 0.9)
    # the ledger charges frozen matrices less: B never costs more FLOPs per step than A
    assert b["train_flops"] / b["optimizer_steps"] <= a["train_flops"] / a["optimizer_steps"] * (1 + 1e-9)
    for key in ("wall_time", "steps", "train_flops"):
        assert rep["speedup"][key] > 0
    assert rep["speedup"]["steps"] == pytest.approx(a["optimizer_steps"] / b["optimizer_steps"])
    ttc = rep["ttc"]
    assert ttc["k_max"] == 8 and ttc["samples_per_problem"] == 8
    assert set(ttc["selections"]) == {"pass@k", "majority@k"}
    for sel in ttc["selections"].values():
        assert sel["reference"] == f"A@{a['optimizer_steps']}"
        c = sel["choice"]
        assert c is not None  # the reference itself always meets its own target
        for key in ("checkpoint", "k", "train_flops_saved", "break_even_queries"):
            assert key in c
    for ck, accs in ttc["accuracy_vs_k"]["pass@k"].items():
        assert len(accs) == 8 and all(x <= y + 1e-12 for x, y in zip(accs, accs[1:])), ck
    # files
    hist = json.loads((out / rep["files"]["history"]).read_text())
    assert len(hist["components"]) == b["num_components"]
    assert hist["samples"] and len(hist["samples"][0]["stat"]) == b["num_components"]
    assert set(rep["files"]["plots"]) == set(PLOTS)
    for name in rep["files"]["plots"].values():
        _check_png(out / name)
    assert (out / rep["files"]["samples"]).stat().st_size > 0
    for line in (out / rep["files"]["samples"]).read_text().splitlines():
        assert json.loads(line)["infer_flops_per_sample"] == ttc["infer_flops_per_sample"]
    report_line = next(ln for ln in printed.splitlines() if ln.startswith("report:"))
    for f in ("report.json", "table.txt", "grades_history.json", "ttc_samples.jsonl", "loss.png"):
        assert f in report_line, f
    table = (out / "table.txt").read_text()
    for needle in ("wall time", "optimizer steps", "training FLOPs", "test accuracy", "pass@k", "majority@k",
                   "break-even"):
        assert needle in table


def test_ttc_cli_on_the_demo_samples(quick_report, capsys):
    """``grades ttc`` on the demo's samples: a choice per strategy (pass@k marked as an upper
    bound), Q* from the file alone, the demo's tolerance, and the full table only on request."""
    from grades.ttc.cli import main as ttc_main
    out, _ = quick_report
    samples = str(out / "ttc_samples.jsonl")
    rep = json.loads((out / "report.json").read_text())
    ttc_main([samples])
    text = capsys.readouterr().out
    assert "tolerance 0.02" in text and "from the samples file" in text
    lines = text.splitlines()
    i = lines.index("choice per strategy (fewest training FLOPs meeting the target):")
    per = {ln.split()[0]: ln for ln in lines[i + 1:i + 3]}
    assert set(per) == {"pass@k", "majority@k"} and "upper bound" in per["pass@k"]
    assert "upper bound" not in per["majority@k"]
    for s, ln in per.items():
        c = rep["ttc"]["selections"][s]["choice"]
        assert f"{c['checkpoint']}, k={c['k']}:" in ln and "n/a" not in ln  # the demo's own choice
    assert "(* meets target - tolerance)" not in text
    ttc_main([samples, "--table"])
    assert "(* meets target - tolerance)" in capsys.readouterr().out


def test_table_is_printed(tmp_path, capsys):
    rc = main(["--quick", "--steps", "12", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "A: GradES off" in printed and "B: GradES on" in printed
    for needle in ("wall time (s)", "optimizer steps", "training FLOPs", "test accuracy", "TTC"):
        assert needle in printed
    # 12 steps learn nothing: the premise check says so, and no TTC target is derived from A
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["premise"]["baseline_converged"] is False
    assert "NOTE: the baseline A did not converge" in printed and "[baseline did not converge]" in printed
    assert rep["ttc"]["selections"] == {} and "no choice: the baseline A did not converge" in printed
    assert rep["ttc"]["accuracy_vs_k"]["pass@k"]  # the curves are still measured
    _check_png(tmp_path / "r" / "ttc_accuracy.png")


def test_premise():
    from grades.demo.runner import premise
    assert premise(0.95) == {"baseline_converged": True, "min_accuracy": 0.9, "reason": None}
    bad = premise(0.102)
    assert bad["baseline_converged"] is False and "0.102" in bad["reason"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--model-size", "huge"], "unknown model size"),
    (["--digits", "9"], "--digits must be in [2, 8] for sort"),
    (["--task", "addition", "--digits", "7"], "--digits must be in [1, 6] for addition"),
    (["--task", "addition", "--digits", "1"], "too few"),
    (["--digits", "2"], "too few"),
    (["--device", "tpu"], "unknown device"),
    (["--rel-tau", "0"], "--rel-tau"),
    (["--freeze-quorum", "1.5"], "freeze_quorum must be"),
])
def test_bad_flags_error_cleanly(argv, message, tmp_path, capsys):
    rc = main(argv + ["--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_unknown_flag_and_bad_type(capsys):
    assert main(["--no-such-flag"]) == 2
    assert main(["--steps", "many"]) == 2
    err = capsys.readouterr().err
    assert "usage" in err


def test_cuda_unavailable_is_a_clear_error(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """``python -m grades demo`` reaches the demo (argument errors only: cheap)."""
    r = subprocess.run([sys.executable, "-m", "grades", "demo", "--steps", "0", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--steps must be >= 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "grades", "demo", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_sort_task_problems_are_sorted_distinct_and_seeded():
    from grades.demo.tasks import SortTask
    t = SortTask(digits=5, seed=3, n_val=10, n_test=20, max_train=200)
    exs = t.val + t.test + t.train
    assert len({e.prompt for e in exs}) == len(exs) == 230
    for e in exs:
        assert e.prompt.endswith("=") and len(e.prompt) == 6 and e.answer == "".join(sorted(e.prompt[:-1]))
        assert t.verify(e, e.answer) and not t.verify(e, e.answer[::-1] if e.answer != e.answer[::-1] else "x")
    assert SortTask(digits=5, seed=3, n_val=10, n_test=20, max_train=200).test == t.test
    assert SortTask(digits=5, seed=4, n_val=10, n_test=20, max_train=200).test != t.test
    b = t.train_batch(t.train[:3])
    assert b["input_ids"].shape == (3, t.prompt_len + t.answer_len + 1)
    with pytest.raises(ValueError, match="digits must be in"):
        SortTask(digits=1)
    with pytest.raises(ValueError, match="leaves no training data"):
        SortTask(digits=2, n_val=50, n_test=50)


def test_clipped_training_keeps_gradES_on_the_unclipped_gradient(monkeypatch):
    """The demo clips the gradient's total norm; GradES is told the clip, so its statistics stay
    those of the unclipped gradient (clipped ones would be about 1000x smaller here)."""
    import torch
    from dataclasses import replace
    from grades.demo.config import DemoConfig
    from grades.demo.train import make_task, train

    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, **kw: calls.append(m) or clip(p, m, **kw))
    base = DemoConfig(steps=6, n_val=20, n_test=20, threads=None, max_grad_norm=None)
    task = make_task(base)
    plain = train(base, task, "B", progress=False)
    assert calls == []
    clipped = train(replace(base, max_grad_norm=1e-3), task, "B", progress=False)
    assert calls == [1e-3] * 6
    for a, b in zip(plain.grades.history, clipped.grades.history, strict=True):
        assert b["stat"] == pytest.approx(a["stat"], rel=0.5), a["step"]
    assert clipped.grades.history[0]["stat"] == pytest.approx(plain.grades.history[0]["stat"], rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_bad_max_grad_norm_is_refused(bad):
    from grades.demo.config import DemoConfig, validate
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        validate(DemoConfig(max_grad_norm=bad))
    with pytest.raises(TypeError, match="max_grad_norm must be a real number, got str"):
        validate(DemoConfig(max_grad_norm="1.0"))


def test_the_freeze_quorum_reaches_gradES():
    """``--freeze-quorum`` (DemoConfig.freeze_quorum) is run B's GradESConfig.freeze_quorum."""
    from grades.demo import _config_from_args, build_parser
    from grades.demo.models import tiny_llama
    from grades.demo.train import _optimizer, make_task
    cfg = _config_from_args(build_parser().parse_args(["--freeze-quorum", "0.75"]))
    model = tiny_llama(make_task(cfg).vocab_size, cfg.model_size, seed=0)
    _, gs = _optimizer(cfg, model, "B")
    assert gs.config.freeze_quorum == 0.75
