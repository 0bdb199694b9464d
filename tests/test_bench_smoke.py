"""Every benchmark script that exists runs in --smoke mode and writes valid JSON.

Convention: each ``bench/<name>.py`` accepts ``--smoke`` (seconds) and ``--out DIR`` (overrides
``bench/results/<device>``), and ``--device`` where it has a device choice. Here they run on the
CPU into a temporary folder.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = ("kernel_bandwidth", "optim", "overhead", "ttc_eval", "ttc_stop", "e2e", "grades_defaults")


def _help(script: Path) -> str:
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, f"{script.name} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_smoke(name, tmp_path):
    script = BENCH / f"{name}.py"
    if not script.exists():
        pytest.skip(f"bench/{name}.py does not exist")
    usage = _help(script)
    if "--out" not in usage:
        pytest.skip(f"bench/{name}.py takes no --out flag; it would write into bench/results")
    assert "--smoke" in usage, f"bench/{name}.py takes no --smoke flag"
    cmd = [sys.executable, str(script), "--smoke", "--out", str(tmp_path)]
    if "--device" in usage:
        cmd += ["--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    written = sorted(tmp_path.rglob("*.json"))
    assert written, f"bench/{name}.py --smoke wrote no JSON into --out"
    for f in written:
        with open(f) as fh:
            data = json.load(fh)
        assert isinstance(data, (dict, list)) and data, f"{f} is empty"


def test_optim_bf16_smoke(tmp_path):
    """bench/optim.py --dtype bf16 adds the master-weight variant and its float32 anchor."""
    cmd = [sys.executable, str(BENCH / "optim.py"), "--smoke", "--dtype", "bf16", "--device", "cpu",
           "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    with open(tmp_path / "optim-bf16.json") as fh:
        names = {row["optimizer"] for row in json.load(fh)["results"]}
    assert {"grades_master", "torch_fused_fp32", "torch_fused"} <= names


def test_run_all_rejects_bad_device():
    r = subprocess.run(["bash", str(BENCH / "run_all.sh"), "tpu"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


def test_no_bench_script_shadows_an_installed_module():
    """``python bench/<name>.py`` puts bench/ first on ``sys.path``, so a script named like an
    installed top-level module is imported in its place (transformers imports ``kernels``, its
    dependency, when it loads its models)."""
    import importlib.util
    clash = []
    for script in BENCH.glob("*.py"):
        spec = importlib.util.find_spec(script.stem)
        if spec is not None and spec.origin and Path(spec.origin).parent != BENCH:
            clash.append(f"{script.name} shadows {spec.origin}")
    assert not clash, clash


def test_grades_defaults_counts_seeds_within_the_aim(monkeypatch):
    """A seed 0.5 points below full training is within the aim (float error forgiven), 0.6 is not."""
    monkeypatch.syspath_prepend(str(BENCH))
    from grades_defaults import summarise
    per = [{"task": "t", "seed": s, "budget": 100,
            "runs": {"full": {"steps": 100, "flops": 1.0, "acc": 1.0},
                     "rule": {"steps": 50, "flops": 0.5, "acc": acc}}}
           for s, acc in enumerate((0.994, 0.995, 1.0))]
    got = summarise(per)["t"]["rule"]
    assert (got["seeds"], got["within_aim"]) == (3, 2)
    assert got["delta_worst"] == pytest.approx(-0.6)
