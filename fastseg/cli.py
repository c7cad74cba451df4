"""The ``fastseg`` command: ``fastseg info``, ``fastseg bench``."""
import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path


def _info(args):
    import torch

    import fastseg
    from fastseg import _backends

    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return "not installed"

    print(f"fastseg {fastseg.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()})")
    print(f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
          f"GPU visible: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})")
    print(f"triton  {version('triton') if _backends.TRITON_INSTALLED else 'not installed'}"
          f"{' (TRITON_INTERPRET=1)' if _backends.TRITON_INTERPRETED else ''}")
    cuda = _backends.CUDA_COMPILED
    extension = "loaded" if _backends.EXTENSION_LOADED else f"not loaded: {_backends.EXTENSION_ERROR}"
    print(f"fastseg._C {extension}"
          f"{f'; CUDA kernels compiled for CUDA {cuda // 1000}.{cuda % 1000 // 10}' if cuda else ''}")
    print(f"CPU threads: {torch.get_num_threads()}")
    print()
    print(f"{'backend':<10} {'cpu':<44} cuda")
    for backend in _backends.BACKENDS:
        cells = []
        for device_type in ("cpu", "cuda"):
            reason = _backends.unavailable_reason(backend, device_type)
            if reason is None and device_type == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device visible"
            cells.append("yes" if reason is None else f"no ({reason})")
        print(f"{backend:<10} {cells[0]:<44} {cells[1]}")
    return 0


# op name -> (benchmark file, pytest -k expression selecting its cases in that file, or None)
BENCH_OPS = {
    "unpool": ("test_bench_unpool.py", None),
    "crf": ("test_bench_dense_crf.py", None),
    "atrous": ("test_bench_atrous.py", "not aspp"),
    "aspp": ("test_bench_atrous.py", "aspp"),
    "gcn": ("test_bench_gcn.py", None),
    "models": ("test_bench_models.py", None),
}


def _benchmark_dir():
    """The benchmark suite: installed as fastseg/benchmarks, or benchmarks/ beside an editable
    checkout's fastseg/."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "benchmarks", package.parent / "benchmarks"):
        if (candidate / "conftest.py").is_file():
            return candidate
    return None


def _writable(option, path):
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        return f"{option} {path}: the folder {parent} does not exist"
    if not os.access(parent, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        return f"{option} {path}: not writable"
    return None


def _bench(args):
    import torch

    def fail(message):
        print(f"fastseg bench: {message}", file=sys.stderr)
        return 2

    ops = [op.strip() for op in args.ops.split(",") if op.strip()] if args.ops else list(BENCH_OPS)
    unknown = [op for op in ops if op not in BENCH_OPS]
    if unknown:
        return fail(f"unknown op {', '.join(map(repr, unknown))}; choose from {', '.join(BENCH_OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device is available here")
    if args.threads is not None and args.threads < 1:
        return fail(f"--threads must be >= 1, got {args.threads}")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and _writable(option, path)
        if problem:
            return fail(problem)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail("--plot needs matplotlib: pip install matplotlib (or fastseg[bench])")
    suite = _benchmark_dir()
    if suite is None:
        return fail("the benchmark suite is not installed with this copy of fastseg")

    selected = {}  # file -> -k expressions
    for op in ops:
        file, expression = BENCH_OPS[op]
        if (suite / file).is_file():
            selected.setdefault(file, []).append(expression)
        elif args.ops:
            return fail(f"op {op!r} has no benchmarks in this version of fastseg")
    if not selected:
        return fail("no benchmarks to run")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite),
               "--benchmark-columns=median,rounds", "--benchmark-sort=name"]
    command += [str(suite / file) for file in selected]
    expressions = [e for es in selected.values() for e in es]
    if None not in expressions:
        command += ["-k", " or ".join(f"({e})" for e in expressions)]
    if args.quick:
        command += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    env = dict(os.environ)
    env.update(FASTSEG_BENCH_QUICK="1" if args.quick else "0")
    for name, value in (("DEVICE", args.device), ("THREADS", args.threads), ("JSON", args.json), ("PLOT", args.plot)):
        if value is not None:
            env[f"FASTSEG_BENCH_{name}"] = str(Path(value).expanduser().resolve()) if name in ("JSON", "PLOT") else str(value)
    print("+ " + " ".join(command), flush=True)
    return subprocess.call(command, env=env, cwd=suite)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastseg", description="fast segmentation kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, and which backends run here")
    info.set_defaults(run=_info)
    bench = commands.add_parser(
        "bench", help="benchmark fastseg's ops against their peers (pytest-benchmark suite)",
        description="Times each op beside its peers in one run and prints medians, speed-ups and "
        "the fraction of this machine's measured copy bandwidth or GEMM rate.",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], help="only this device (default: every one present)")
    bench.add_argument("--ops", help=f"comma-separated subset of: {', '.join(BENCH_OPS)}")
    bench.add_argument("--quick", action="store_true", help="one shape per op and short timing: about 2 minutes on 2 cores")
    bench.add_argument("--json", metavar="PATH", help="write the results, with versions and peaks, as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speed-ups")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
