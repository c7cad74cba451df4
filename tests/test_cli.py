"""The `fastseg` command: `info`, and `bench`'s argument handling, JSON report and plot."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastseg


def _fastseg(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fastseg", *args], capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def test_info():
    result = _fastseg("info")
    assert result.returncode == 0, result.stderr
    assert "fastseg " + fastseg.__version__ in result.stdout
    for backend in ("reference", "cpp", "cuda", "triton"):
        assert f"\n{backend} " in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--ops", "unpool,nope"], "unknown op 'nope'; choose from unpool, crf"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--json", "/nonexistent-dir/out.json"], "--json /nonexistent-dir/out.json: the folder /nonexistent-dir does not exist"),
    (["--plot", "/nonexistent-dir/out.png"], "--plot /nonexistent-dir/out.png: the folder"),
    (["--ops", ""], "--ops names no op"),
    (["--json", "/tmp"], "needs a file name, not a folder"),
    (["--json", ""], "needs a file name, not a folder"),
    (["--plot", "/tmp/chart.xyz"], "--plot /tmp/chart.xyz: matplotlib writes"),
])
def test_bench_rejects_bad_arguments(args, message):
    result = _fastseg("bench", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU exists")
def test_bench_cuda_without_gpu():
    result = _fastseg("bench", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device is available here" in result.stderr


@pytest.mark.slow
def test_bench_writes_json_and_plot(tmp_path):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _fastseg(
        "bench", "--ops", "unpool", "--quick", "--device", "cpu", "--threads", "1",
        "--json", str(report), "--plot", str(plot), env={"FASTSEG_BENCH_SMOKE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fastseg speed-up" in result.stdout
    data = json.loads(report.read_text())
    assert data["schema"] == "fastseg-bench/1"
    assert {"fastseg", "torch", "python", "processor", "cpu_threads", "triton", "date"} <= set(data["environment"])
    assert data["environment"]["cpu_threads"] == 1
    assert data["peaks"]["cpu"]["copy_bytes_per_s"] > 0 and data["peaks"]["cpu"]["gemm_flops_per_s"] > 0
    impls = {r["impl"] for r in data["results"]}
    assert {"fastseg", "torch eager"} <= impls
    for row in data["results"]:
        assert row["median_s"] > 0 and row["device"] == "cpu" and row["group"].startswith("max_unpool2d")
        assert row["gb_per_s"] > 0
        assert (row["speedup"] is None) == (row["impl"] == "fastseg")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ops, files, kept", [
    ("aspp,unpool", ["test_bench_atrous.py", "test_bench_unpool.py"], {"aspp", "unpool"}),
    ("atrous", ["test_bench_atrous.py"], {"atrous"}),
    ("atrous,aspp", ["test_bench_atrous.py"], {"atrous", "aspp"}),
])
def test_bench_runs_only_the_selected_ops(ops, files, kept):
    # One file serves atrous and aspp: another op beside one of them must not bring in the other.
    from fastseg.cli import bench_op_of

    suite = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", suite,
         *(os.path.join(suite, f) for f in files)],
        capture_output=True, text=True, timeout=300, cwd=suite,
        env=dict(os.environ, FASTSEG_BENCH_OPS=ops, FASTSEG_BENCH_SMOKE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    found = {bench_op_of(i.split("::")[0].split("/")[-1], i.split("::")[1]) for i in ids}
    assert found == kept, ids


def test_compile_peer_never_falls_back_to_eager():
    # A benchmark file compiles one function for all its shapes: past dynamo's default 8 graphs it
    # would time eager PyTorch under the torch.compile label.
    from fastseg.benchmarking import compiled

    def double(x):
        return x * 2

    peer = compiled(double, "cpu")
    for n in range(1, 12):
        torch._dynamo.reset() if n == 1 else None
        assert torch.equal(peer(torch.ones(n)), torch.full((n,), 2.0))
    assert torch._dynamo.config.fail_on_recompile_limit_hit
