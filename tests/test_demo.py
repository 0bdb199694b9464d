"""``grades demo``: the quick configuration end to end, its report directory, and bad flags."""
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
    rc = main(["--quick", "--out", str(out), "--no-progress", "--seed", "0"])
    assert rc == 0
    return out


def test_quick_report_has_every_figure(quick_report, capsys):
    out = quick_report
    rep = json.loads((out / "report.json").read_text())
    for key in ("config", "model", "task", "runs", "speedup", "accuracy_delta", "grades", "ttc", "files",
                "environment", "table"):
        assert key in rep, key
    assert rep["config"]["quick"] is True
    for run in ("A", "B"):
        r = rep["runs"][run]
        for key in ("wall_time_s", "optimizer_steps", "train_flops", "test_accuracy", "checkpoints"):
            assert key in r, (run, key)
        assert r["wall_time_s"] > 0 and r["train_flops"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
    a, b = rep["runs"]["A"], rep["runs"]["B"]
    assert a["optimizer_steps"] == rep["config"]["steps"]
    assert 1 <= b["optimizer_steps"] <= a["optimizer_steps"]
    assert b["stopped_early"] == (b["frozen_components"] == b["num_components"])
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
    table = (out / "table.txt").read_text()
    for needle in ("wall time", "optimizer steps", "training FLOPs", "test accuracy", "pass@k", "majority@k",
                   "break-even"):
        assert needle in table


def test_table_is_printed(tmp_path, capsys):
    rc = main(["--quick", "--steps", "12", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "A: AdamW" in printed and "B: GradES" in printed
    for needle in ("wall time (s)", "optimizer steps", "training FLOPs", "test accuracy", "TTC"):
        assert needle in printed


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--model-size", "huge"], "unknown model size"),
    (["--digits", "9"], "--digits must be in [1, 6]"),
    (["--digits", "1"], "too few"),
    (["--device", "tpu"], "unknown device"),
    (["--rel-tau", "0"], "--rel-tau"),
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
