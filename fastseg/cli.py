"""The ``fastseg`` command: ``fastseg info``, ``fastseg bench``, ``fastseg crf``."""
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
    try:
        isa = _backends.cpu_isa()
    except ValueError as error:  # a bad FASTSEG_CPU_ISA
        isa = f"error: {error}"
    print(f"CPU threads: {torch.get_num_threads()}" + (f"; C++ CPU loops: {isa}" if isa else ""))
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


# op name -> (benchmark file, which of its tests by name, or None for all); the suite's conftest
# keeps the selected ops' tests (FASTSEG_BENCH_OPS), one file possibly serving two ops.
BENCH_OPS = {
    "unpool": ("test_bench_unpool.py", None),
    "crf": ("test_bench_dense_crf.py", None),
    "atrous": ("test_bench_atrous.py", lambda name: "aspp" not in name),
    "aspp": ("test_bench_atrous.py", lambda name: "aspp" in name),
    "gcn": ("test_bench_gcn.py", None),
    "unpool_conv": ("test_bench_unpool_conv.py", None),
    "models": ("test_bench_models.py", None),
}


def bench_op_of(file_name, test_name):
    """The BENCH_OPS op a benchmark test belongs to, or None."""
    for op, (file, covers) in BENCH_OPS.items():
        if file == file_name and (covers is None or covers(test_name)):
            return op
    return None


def _benchmark_dir():
    """The benchmark suite: installed as fastseg/benchmarks, or benchmarks/ beside an editable
    checkout's fastseg/."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "benchmarks", package.parent / "benchmarks"):
        if (candidate / "conftest.py").is_file():
            return candidate
    return None


def _writable(option, path):
    if Path(path).expanduser().is_dir() or not str(path).strip():
        return f"{option} {path!r}: needs a file name, not a folder"
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

    ops = [op.strip() for op in args.ops.split(",") if op.strip()] if args.ops is not None else list(BENCH_OPS)
    unknown = [op for op in ops if op not in BENCH_OPS]
    if unknown:
        return fail(f"unknown op {', '.join(map(repr, unknown))}; choose from {', '.join(BENCH_OPS)}")
    if not ops:
        return fail(f"--ops names no op; choose from {', '.join(BENCH_OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device is available here")
    if args.threads is not None and args.threads < 1:
        return fail(f"--threads must be >= 1, got {args.threads}")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path is not None and _writable(option, path)
        if problem:
            return fail(problem)
    if args.plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return fail("--plot needs matplotlib: pip install matplotlib (or fastseg[bench])")
        if not Path(args.plot).suffix:
            args.plot += ".png"
        formats = Figure().canvas.get_supported_filetypes()
        if Path(args.plot).suffix[1:].lower() not in formats:
            return fail(f"--plot {args.plot}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}")
    suite = _benchmark_dir()
    if suite is None:
        return fail("the benchmark suite is not installed with this copy of fastseg")

    files = []
    for op in ops:
        file = BENCH_OPS[op][0]
        if not (suite / file).is_file():
            return fail(f"op {op!r} has no benchmarks in this version of fastseg")
        files += [file] if file not in files else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite),
               "--benchmark-columns=median,rounds", "--benchmark-sort=name"]
    command += [str(suite / file) for file in files]
    if args.quick:
        command += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    env = dict(os.environ)
    env.update(FASTSEG_BENCH_QUICK="1" if args.quick else "0", FASTSEG_BENCH_OPS=",".join(ops))
    for name, value in (("DEVICE", args.device), ("THREADS", args.threads), ("JSON", args.json), ("PLOT", args.plot)):
        if value is not None:
            env[f"FASTSEG_BENCH_{name}"] = str(Path(value).expanduser().resolve()) if name in ("JSON", "PLOT") else str(value)
    print("+ " + " ".join(command), flush=True)
    return subprocess.call(command, env=env, cwd=suite)


# --- fastseg crf ---------------------------------------------------------------------------------

# Files a directory run takes as images (Pillow reads them all).
_CRF_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class _CrfError(Exception):
    """A bad input to ``fastseg crf``: printed as one line, exit code 2."""


def _crf_palette(n):
    """The PASCAL VOC colour map (label bits spread over the high bits of R, G, B): label 0 black,
    neighbouring labels far apart, the same colours every VOC tool shows."""
    palette = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


def _crf_read_image(Image, np, path, what, exact=False):
    """(H, W, C) pixels: grey images keep one channel (the bilateral kernel then works on
    intensity), everything else becomes RGB (alpha dropped, palettes expanded). Photos come back
    as uint8, 16-bit ones scaled; with ``exact`` (annotations) 16-bit grey values stay as they are,
    since each one may be a label."""
    path = Path(path)
    if not path.is_file():
        raise _CrfError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as opened:
            mode = opened.mode
            if mode.startswith("I"):  # 16- or 32-bit integer grey ("I;16", "I;16B", "I")
                pixels = np.array(opened).astype(np.int64)
            elif mode == "F":
                raise _CrfError(f"{what} {path}: is a floating-point image; save it with 8- or 16-bit integer pixels")
            else:
                grey = mode in ("1", "L", "LA")
                pixels = np.array(opened.convert("L" if grey else "RGB"))
    except _CrfError:
        raise
    except Exception as error:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
        raise _CrfError(f"{what} {path}: cannot read it as an image ({error})") from None
    if pixels.dtype != np.uint8 and not exact:
        low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
        if low < 0 or high > 65535:
            raise _CrfError(f"{what} {path}: has pixel values in [{low}, {high}]; expected 8- or 16-bit")
        # A 16-bit PNG spans 0..65535; "I" images holding 8-bit values are left alone.
        wide = mode.startswith("I;16") or high > 255
        pixels = ((pixels + 128) // 257 if wide else pixels).astype(np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _crf_read_probs(np, path, H, W):
    path = Path(path)
    if not path.is_file():
        raise _CrfError(f"--probs {path}: no such file")
    try:
        probs = np.load(path, allow_pickle=False)
    except Exception as error:
        raise _CrfError(f"--probs {path}: cannot read it as a .npy array ({error})") from None
    if not isinstance(probs, np.ndarray) or probs.dtype.kind not in "fiu":
        raise _CrfError(f"--probs {path}: expected a float array (L, H, W), got dtype {getattr(probs, 'dtype', type(probs).__name__)}")
    shape = probs.shape
    if len(shape) != 3 or shape[1:] != (H, W):
        if len(shape) == 3 and shape[:2] == (H, W):
            raise _CrfError(f"--probs {path}: has shape {shape}, i.e. (H, W, L); fastseg crf takes (L, H, W) = "
                            f"(L, {H}, {W}): save np.moveaxis(probs, -1, 0)")
        raise _CrfError(f"--probs {path}: has shape {shape} but the image is {H}x{W} (H x W); expected (L, {H}, {W})")
    if shape[0] < 2:
        raise _CrfError(f"--probs {path}: has {shape[0]} label; a CRF needs at least 2")
    if shape[0] > 256:
        raise _CrfError(f"--probs {path}: has {shape[0]} labels; the palette PNG output holds at most 256")
    probs = probs.astype(np.float32)
    if not np.isfinite(probs).all():
        raise _CrfError(f"--probs {path}: contains non-finite values (nan or inf)")
    low, high = float(probs.min()), float(probs.max())
    if low < 0 or high > 1 + 1e-4:
        raise _CrfError(f"--probs {path}: probabilities must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                        f"(logits? apply a softmax over the label axis first)")
    return np.clip(probs, 0, 1)


# Labels beyond this many are refused: the output palette PNG holds 256, and an "annotation" with
# thousands of colours is a JPEG or a photograph, whose unary alone would take gigabytes.
_CRF_MAX_LABELS = 256


def _crf_labels_from_annotation(np, annotation, path, gt_prob):
    """The reference example's unary: labels are the distinct non-black colours (sorted by their
    24-bit value, or by grey value for a one-channel annotation), black is unknown (uniform p);
    p = gt_prob for the annotated label and (1 - gt_prob) / (L - 1) for the others. Returns
    (energies (L, H, W), colours (L, C) in the annotation's dtype, labels (H, W) with -1 for
    unknown)."""
    from .crf import unary_from_labels

    H, W, C = annotation.shape
    if C == 1:
        flat = annotation[..., 0].astype(np.int64)
    else:
        rgb = annotation.astype(np.int64)
        flat = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    values, inverse = np.unique(flat, return_inverse=True)
    unknown = values[0] == 0
    colours = values[1:] if unknown else values
    if len(colours) < 2:
        raise _CrfError(f"annotation {path}: has {len(colours)} non-black colour(s); "
                        f"it needs at least 2 labels (black means unknown)")
    if len(colours) > _CRF_MAX_LABELS:
        raise _CrfError(f"annotation {path}: has {len(colours)} distinct non-black colours, so as many labels; "
                        f"at most {_CRF_MAX_LABELS} are taken. An annotation paints each label in one flat "
                        f"colour and is saved losslessly (PNG): is this a JPEG or a photograph?")
    if C == 1 and annotation.dtype != np.uint8 and (colours[0] < 0 or colours[-1] > 65535):
        raise _CrfError(f"annotation {path}: has grey values in [{colours[0]}, {colours[-1]}]; expected 8- or 16-bit")
    labels = inverse.reshape(H, W) - int(unknown)  # -1: unknown
    energies = unary_from_labels(labels.reshape(-1) + 1, len(colours), gt_prob, zero_unsure=True)
    if C == 1:
        palette = colours[:, None].astype(annotation.dtype if annotation.dtype == np.uint8 else np.uint16)
    else:
        palette = np.stack([colours >> 16 & 255, colours >> 8 & 255, colours & 255], 1).astype(np.uint8)
    return energies.reshape(len(colours), H, W), palette, labels


def _crf_one(args, Image, np, image_path, annotation_path, probs_path, out_path):
    import torch

    from .ops.dense_crf import dense_crf

    image = _crf_read_image(Image, np, image_path, "image")
    H, W = image.shape[:2]
    if annotation_path is not None:
        annotation = _crf_read_image(Image, np, annotation_path, "annotation", exact=True)
        if annotation.shape[:2] != (H, W):
            raise _CrfError(f"annotation {annotation_path}: is {annotation.shape[1]}x{annotation.shape[0]} "
                            f"(W x H) but image {image_path} is {W}x{H}")
        energies, colours, input_labels = _crf_labels_from_annotation(np, annotation, annotation_path, args.gt_prob)
        scores, unary = torch.from_numpy(energies), "energy"
    else:
        probs = _crf_read_probs(np, probs_path, H, W)
        scores, unary = torch.from_numpy(probs), "probs"
        colours = np.array(_crf_palette(256), dtype=np.uint8)
        input_labels = probs.argmax(0)
    q = dense_crf(
        scores, torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), iterations=args.iterations,
        gaussian=dict(sxy=args.sxy_gaussian, compat=args.compat_gaussian),
        bilateral=dict(sxy=args.sxy_bilateral, srgb=args.srgb, compat=args.compat_bilateral), unary=unary,
    )
    refined = q.argmax(0).numpy()
    if annotation_path is not None:
        # The annotation's own colours (RGB, or grey at its own bit depth), as the reference example writes them.
        result = Image.fromarray(colours[refined] if colours.shape[1] == 3 else colours[refined, 0])
    else:
        result = Image.fromarray(refined.astype(np.uint8), "P")
        result.putpalette(colours.reshape(-1).tolist())
    _crf_save(result, out_path)
    if args.overlay:
        if colours.dtype != np.uint8:  # 16-bit grey labels: show them in VOC colours
            colours = np.array(_crf_palette(len(colours)), dtype=np.uint8)
        elif colours.shape[1] == 1:
            colours = np.repeat(colours, 3, axis=1)
        unknown_black = np.concatenate([colours, np.zeros((1, 3), np.uint8)])  # index -1: black
        panels = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image,
                  unknown_black[input_labels], colours[refined]]
        _crf_save(Image.fromarray(np.concatenate(panels, axis=1), "RGB"), _crf_overlay_path(out_path))


def _crf_overlay_path(out_path):
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_overlay.png")


def _crf_save(picture, path):
    try:
        picture.save(path, format="PNG")
    except (OSError, ValueError) as error:
        raise _CrfError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}") from None


def _crf_check_options(args):
    if args.iterations < 0:
        raise _CrfError(f"--iterations must be >= 0, got {args.iterations}")
    if not 0 < args.gt_prob < 1:
        raise _CrfError(f"--gt-prob must be in (0, 1), got {args.gt_prob}")
    for option in ("sxy_gaussian", "sxy_bilateral", "srgb"):
        value = getattr(args, option)
        if not (value > 0 and value != float("inf")):
            raise _CrfError(f"--{option.replace('_', '-')} must be > 0 and finite, got {value}")
    for option in ("compat_gaussian", "compat_bilateral"):
        value = getattr(args, option)
        if value != value or abs(value) == float("inf"):
            raise _CrfError(f"--{option.replace('_', '-')} must be finite, got {value}")
    if (args.annotation is None) == (args.probs is None):
        raise _CrfError("give either ANNOTATION or --probs P.npy (exactly one)"
                        if args.annotation is None else "give ANNOTATION or --probs, not both")


def _crf_jobs(args):
    """(image, annotation or None, probs or None, output) for each image to refine."""
    image, labels = Path(args.image), Path(args.annotation or args.probs)
    label_option = "ANNOTATION" if args.annotation else "--probs"
    if not image.exists():
        raise _CrfError(f"image {image}: no such file or directory")
    if not labels.exists():
        raise _CrfError(f"{label_option} {labels}: no such file or directory")
    out = Path(args.output)
    if not image.is_dir():
        if labels.is_dir():
            raise _CrfError(f"{label_option} {labels} is a directory but IMAGE {image} is a file")
        if out.is_dir():
            raise _CrfError(f"-o {out} is a directory; give the output PNG's file name")
        if out.suffix.lower() != ".png":
            raise _CrfError(f"-o {out}: the output is written as PNG (labels need a lossless format); "
                            f"give a name ending in .png")
        problem = _writable("-o", out) or (args.overlay and _writable("-o", _crf_overlay_path(out)))
        if problem:
            raise _CrfError(problem)
        jobs = [(image, labels if args.annotation else None, labels if args.probs else None, out)]
        _crf_check_outputs(jobs, args.overlay)
        return jobs
    if not labels.is_dir():
        raise _CrfError(f"IMAGE {image} is a directory, so {label_option} must be one too, but {labels} is a file")
    images = sorted(p for p in image.iterdir() if p.is_file() and p.suffix.lower() in _CRF_IMAGE_SUFFIXES)
    if not images:
        raise _CrfError(f"image directory {image}: no image files ({', '.join(sorted(_CRF_IMAGE_SUFFIXES))})")
    jobs = []
    for path in images:
        if args.probs:
            partner = labels / f"{path.stem}.npy"
        else:  # the same name, or the same stem as a PNG (annotations are rarely JPEGs)
            partner = labels / path.name
            if not partner.is_file() and (labels / f"{path.stem}.png").is_file():
                partner = labels / f"{path.stem}.png"
        if not partner.is_file():
            raise _CrfError(f"{label_option} {partner}: no such file (needed for {path})")
        jobs.append((path, partner if args.annotation else None, partner if args.probs else None,
                     out / f"{path.stem}.png"))
    if out.exists() and not out.is_dir():
        raise _CrfError(f"-o {out} is a file; with a directory of images give an output directory")
    _crf_check_outputs(jobs, args.overlay)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _CrfError(f"-o {out}: cannot create the directory ({error.strerror or error})") from None
    if not os.access(out, os.W_OK):
        raise _CrfError(f"-o {out}: not writable")
    return jobs


def _crf_check_outputs(jobs, overlay):
    """Refuses a run whose outputs would overwrite an input or each other (a.png and a.jpg in one
    directory both make a.png)."""
    def key(path):
        return os.path.normcase(os.path.realpath(path))

    inputs = {key(path): path for job in jobs for path in job[:3] if path is not None}
    written = {}
    for image, *_, out in jobs:
        for path in [out, _crf_overlay_path(out)] if overlay else [out]:
            if key(path) in inputs:
                raise _CrfError(f"-o {path}: is the input {inputs[key(path)]}; "
                                f"refusing to overwrite it (choose another output)")
            if key(path) in written:
                raise _CrfError(f"{written[key(path)]} and {image} would both be written to {path}; "
                                f"rename one of them")
            written[key(path)] = image


def _crf_progress(done, total, name, started, stream=sys.stderr):
    """A one-line progress bar on stderr: redrawn in place on a terminal, one line per image in a log."""
    import time

    width = 30
    filled = width * done // total
    elapsed = time.perf_counter() - started
    rate = f"{elapsed / done:.2f} s/image" if done else ""
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate} {name}"
    if stream.isatty():
        stream.write("\r" + line + "\x1b[K")
        if done == total:
            stream.write("\n")
    else:
        stream.write(line + "\n")
    stream.flush()


def _crf(args):
    import time

    def fail(message):
        print(f"fastseg crf: {message}", file=sys.stderr)
        return 2

    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return fail("needs Pillow to read and write images: pip install pillow")
    try:
        _crf_check_options(args)
        jobs = _crf_jobs(args)
        started = time.perf_counter()
        directory = Path(args.image).is_dir()
        for done, (image, annotation, probs, out) in enumerate(jobs):
            if directory:
                _crf_progress(done, len(jobs), image.name, started)
            _crf_one(args, Image, np, image, annotation, probs, out)
        if directory:
            _crf_progress(len(jobs), len(jobs), "", started)
            print(f"wrote {len(jobs)} labellings to {args.output}")
        else:
            print(f"wrote {args.output}")
    except _CrfError as error:
        return fail(str(error))
    except (ValueError, TypeError) as error:  # fastseg.dense_crf's own argument checks
        return fail(str(error))
    except MemoryError:
        return fail("out of memory (the image is too large for this machine)")
    return 0


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
    crf = commands.add_parser(
        "crf", help="refine a coarse annotation or model probabilities with a dense CRF",
        description="Dense-CRF refinement (Kraehenbuehl & Koltun, NIPS 2011) of one image or of a "
        "directory of images. With ANNOTATION (a colour or 16-bit grey image: each distinct non-black colour is a "
        "label, black is unknown) the output PNG uses the annotation's colours, as pydensecrf's "
        "example does. With --probs P.npy (float probabilities of shape (L, H, W), label axis first, "
        "as fastseg and PyTorch models lay them out) the output is a palette PNG whose pixel values "
        "are the label indices (PASCAL VOC colours). A directory as IMAGE takes a directory of "
        "same-named annotations (or STEM.npy probabilities) and an output directory.",
    )
    crf.add_argument("image", metavar="IMAGE", help="the photograph (PNG, JPEG, ...), or a directory of them")
    crf.add_argument("annotation", metavar="ANNOTATION", nargs="?",
                     help="coarse colour annotation of IMAGE's size (black = unknown), or a directory of them")
    crf.add_argument("--probs", metavar="P.npy", help="probabilities (L, H, W) instead of ANNOTATION, or a directory of STEM.npy")
    crf.add_argument("-o", "--output", metavar="OUT.png", required=True, help="output PNG (a directory for a directory of images)")
    crf.add_argument("--iterations", type=int, default=5, help="mean-field iterations (default 5)")
    crf.add_argument("--gt-prob", type=float, default=0.7,
                     help="probability of an annotated pixel's label (default 0.7; ANNOTATION only)")
    crf.add_argument("--sxy-gaussian", type=float, default=3.0, help="smoothness kernel width in pixels (default 3)")
    crf.add_argument("--compat-gaussian", type=float, default=3.0, help="smoothness kernel weight, Potts (default 3)")
    crf.add_argument("--sxy-bilateral", type=float, default=80.0, help="appearance kernel width in pixels (default 80)")
    crf.add_argument("--srgb", type=float, default=13.0, help="appearance kernel colour width, 0..255 units (default 13)")
    crf.add_argument("--compat-bilateral", type=float, default=10.0, help="appearance kernel weight, Potts (default 10)")
    crf.add_argument("--overlay", action="store_true",
                     help="also write OUT_overlay.png: image | input labels | refined labels, side by side")
    crf.set_defaults(run=_crf)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
