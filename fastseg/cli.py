"""The ``fastseg`` command: ``fastseg info``."""
import argparse
import platform
import sys


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastseg", description="fast segmentation kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, and which backends run here")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
