"""The prepared GPU check must still run when a device session finally gets one: its CPU dry run runs the
same two scripts end to end (tiny model, toy sizes), and the benchmark's degrade ladder is exercised."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_sdxl", ROOT / "benchmarks" / "sdxl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_both_steps_and_writes_results(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASS gpu_sync_check" in (tmp_path / "gpu_sync_check.log").read_text()
    result = json.loads((tmp_path / "sdxl.json").read_text())
    assert "partial" not in result and result["tuned"]["failed"] == []
    for decoder in ("full", "taesd"):
        assert result["tuned"][f"steps4_{decoder}"]["total_s"] > 0
    assert result["stock"]["steps4"]["decode_s"] > 0
    assert set(result["tuned"]["images_per_s"]) == {"1", "2"}


def test_sync_check_drives_the_backends_own_loop(monkeypatch, capsys):
    """The dry run exercises SDXLPipeline itself — built by build_pipeline, the loop run by its denoise through
    sync_checked and check_sync_free — with the real tiny UNet, not a copy of the loop."""
    from backends.local_sdxl import pipeline as pipeline_module

    calls: dict[str, list] = {
        "build_pipeline": [],
        "denoise": [],
        "sync_checked": [],
        "check_sync_free": [],
        "loop_inputs": [],
    }

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls[name].append(args)
            return real(*args, **kwargs)

        return wrapper

    for name in ("denoise", "sync_checked", "check_sync_free", "loop_inputs"):
        monkeypatch.setattr(pipeline_module.SDXLPipeline, name, spy(name, getattr(pipeline_module.SDXLPipeline, name)))
    monkeypatch.setattr(pipeline_module, "build_pipeline", spy("build_pipeline", pipeline_module.build_pipeline))
    spec = importlib.util.spec_from_file_location("gpu_sync_check", ROOT / "benchmarks" / "gpu_sync_check.py")
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--dry-run", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS gpu_sync_check" in out and "FAIL" not in out
    assert all(calls.values()), {k: len(v) for k, v in calls.items()}
    unets = {type(args[1]).__name__ for args in calls["denoise"]}
    assert "UNet2DConditionModel" in unets  # the real tiny UNet went through the real loop
    assert len(calls["sync_checked"]) >= 2  # the fake-UNet loop and the tiny-UNet loop


def test_a_failing_tuning_is_retried_without_it(monkeypatch, capsys):
    bench = load_bench_module()
    b = bench.Bench(bench.argparse.Namespace(device="cpu", budget_s=60.0))
    b.cuda = True  # the ladder only exists on the GPU
    monkeypatch.setattr(b, "reset_memory", lambda: None)
    calls = []

    def run_tuned(_b, overrides):
        calls.append(overrides)
        if overrides.get("cuda_graphs") is not False:
            raise RuntimeError("capture failed: operation not permitted when stream is capturing")
        return {"steady_s": 1.0}

    monkeypatch.setattr(bench, "run_tuned", run_tuned)
    res = bench.run_tuned_or_degrade(b)
    assert calls == [{}, {"cuda_graphs": False}]
    assert res["overrides"] == {"cuda_graphs": False}
    assert [f["overrides"] for f in res["failed"]] == [{}]
    assert "stream is capturing" in res["failed"][0]["error"]
    assert "tuned FAILED" in capsys.readouterr().out


def test_when_every_rung_fails_the_run_fails(monkeypatch):
    bench = load_bench_module()
    b = bench.Bench(bench.argparse.Namespace(device="cpu", budget_s=60.0))
    b.cuda = True
    monkeypatch.setattr(b, "reset_memory", lambda: None)
    monkeypatch.setattr(bench, "run_tuned", lambda _b, o: (_ for _ in ()).throw(ValueError(f"broken {o}")))
    with pytest.raises(RuntimeError, match=r"failed 3 times; first: ValueError: broken \{\}"):
        bench.run_tuned_or_degrade(b)
