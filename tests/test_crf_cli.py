"""`fastseg crf`: refining pydensecrf's example annotations (against a fresh pydensecrf2 run and
the stored outN.png), model probabilities, --overlay, directory mode, and every bad input.

The commands that produce pictures run as `python -m fastseg crf ...` subprocesses; the bad inputs
call fastseg.cli.main in this process (each fresh interpreter costs seconds importing torch), and
one of them also runs as a subprocess to check the exit status and that no traceback escapes.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastseg
import fastseg.crf
from fastseg.cli import main

Image = pytest.importorskip("PIL.Image", reason="fastseg crf needs Pillow (pip install pillow)")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crf"


def _data(name):
    if not DATA.is_dir():
        pytest.skip(f"dense-CRF example data not found at {DATA}")
    return DATA / name


def _fastseg_crf(*args):
    return subprocess.run([sys.executable, "-m", "fastseg", "crf", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _rgb(path):
    """(H, W) int64 24-bit colours of an image file."""
    a = np.array(Image.open(path).convert("RGB")).astype(np.int64)
    return a[..., 0] << 16 | a[..., 1] << 8 | a[..., 2]


def _example_unary(n):
    """The reference example's energies (L, H, W), its colours (L,) and the image (H, W, 3)."""
    image = np.array(Image.open(_data(f"im{n}.png")).convert("RGB"))
    colours, labels = np.unique(_rgb(_data(f"anno{n}.png")), return_inverse=True)
    assert colours[0] == 0  # the examples all have unknown (black) pixels
    H, W = image.shape[:2]
    unary = fastseg.crf.unary_from_labels(labels.reshape(-1), len(colours) - 1, gt_prob=0.7, zero_unsure=True)
    return unary.reshape(-1, H, W), colours[1:], image


def _pydensecrf_colours(n):
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed (pip install pydensecrf2)")
    unary, colours, image = _example_unary(n)
    L, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(L, -1)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    return colours[np.argmax(d.inference(5), 0).reshape(H, W)]


@pytest.fixture(scope="module")
def example1(tmp_path_factory):
    out = tmp_path_factory.mktemp("crf") / "out1.png"
    result = _fastseg_crf(_data("im1.png"), _data("anno1.png"), "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return out


def test_annotation_matches_fresh_pydensecrf(example1):
    ours = _rgb(example1)
    agreement = (ours == _pydensecrf_colours(1)).mean()
    # Measured: 100.00% (identical labellings).
    assert agreement >= 0.995, f"fastseg crf agrees with pydensecrf2 on {agreement:.3%} of pixels"


def test_annotation_matches_stored_output(example1):
    # out1.png came from an older densecrf build: a sanity check (measured agreement 99.95%; a fresh
    # pydensecrf2 run agrees with it equally).
    assert Image.open(example1).mode == "RGB"
    agreement = (_rgb(example1) == _rgb(_data("out1.png"))).mean()
    assert agreement >= 0.99, f"fastseg crf agrees with out1.png on {agreement:.3%} of pixels"


def test_probs_and_overlay(tmp_path):
    unary, _, image = _example_unary(3)
    probs = torch.softmax(-torch.from_numpy(unary), 0).numpy()
    np.save(tmp_path / "p.npy", probs)
    out = tmp_path / "refined.png"
    result = _fastseg_crf(_data("im3.png"), "--probs", tmp_path / "p.npy", "-o", out, "--overlay",
                          "--iterations", 3, "--gt-prob", 0.9, "--sxy-bilateral", 60, "--srgb", 10)
    assert result.returncode == 0, result.stderr
    written = Image.open(out)
    assert written.mode == "P"  # pixel values are the label indices
    q = fastseg.dense_crf(torch.from_numpy(probs), torch.from_numpy(image).permute(2, 0, 1), iterations=3,
                          bilateral=dict(sxy=60, srgb=10, compat=10), unary="probs")
    labels = np.array(written)
    assert (labels == q.argmax(0).numpy()).mean() >= 0.9999
    overlay = Image.open(tmp_path / "refined_overlay.png")
    H, W = image.shape[:2]
    assert overlay.size == (3 * W, H)
    panels = np.array(overlay.convert("RGB"))
    np.testing.assert_array_equal(panels[:, :W], image)
    palette = np.array(written.getpalette()[:3 * 256]).reshape(-1, 3)
    np.testing.assert_array_equal(panels[:, 2 * W:], palette[labels])
    np.testing.assert_array_equal(panels[:, W:2 * W], palette[probs.argmax(0)])


def test_directory(tmp_path, example1):
    images, annotations, out = tmp_path / "images", tmp_path / "annotations", tmp_path / "out"
    images.mkdir()
    annotations.mkdir()
    for n in (1, 2):
        shutil.copy(_data(f"im{n}.png"), images / f"photo{n}.png")
        shutil.copy(_data(f"anno{n}.png"), annotations / f"photo{n}.png")
    (images / "notes.txt").write_text("not an image: ignored")
    result = _fastseg_crf(images, annotations, "-o", out, "--overlay")
    assert result.returncode == 0, result.stderr
    assert "2/2" in result.stderr  # the progress line
    assert sorted(p.name for p in out.iterdir()) == ["photo1.png", "photo1_overlay.png", "photo2.png",
                                                       "photo2_overlay.png"]
    np.testing.assert_array_equal(_rgb(out / "photo1.png"), _rgb(example1))
    assert Image.open(out / "photo2.png").size == Image.open(_data("im2.png")).size


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def bad(tmp_path):
    """Files for the bad-input cases, in tmp_path."""
    shape = np.array(Image.open(_data("im1.png"))).shape[:2]
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "text.npy").write_text("not an array")
    (tmp_path / "a_file").write_text("")
    anno = np.array(Image.open(_data("anno1.png")).convert("RGB"))
    one = np.where(anno.any(-1, keepdims=True), np.uint8([200, 0, 0]), np.uint8(0))
    Image.fromarray(one.astype(np.uint8)).save(tmp_path / "one_colour.png")
    Image.fromarray(np.zeros_like(anno)).save(tmp_path / "black.png")
    probs = np.full((3, *shape), 1 / 3, np.float32)
    np.save(tmp_path / "probs_hwl.npy", probs.transpose(1, 2, 0))
    np.save(tmp_path / "probs_small.npy", probs[:, :-1])
    np.save(tmp_path / "logits.npy", probs * 6 - 3)
    np.save(tmp_path / "one_label.npy", probs[:1])
    np.save(tmp_path / "nan.npy", np.where(probs > 0, np.nan, probs))
    Image.fromarray(np.zeros(shape, np.float32)).save(tmp_path / "float.tif")
    shutil.copy(_data("im1.png"), tmp_path / "im.png")
    shutil.copy(_data("anno1.png"), tmp_path / "anno.png")
    (tmp_path / "images").mkdir()
    shutil.copy(_data("im1.png"), tmp_path / "images" / "photo.png")
    (tmp_path / "same_stem").mkdir()
    shutil.copy(_data("im1.png"), tmp_path / "same_stem" / "a.png")
    Image.open(_data("im1.png")).save(tmp_path / "same_stem" / "a.jpg")
    (tmp_path / "same_stem_annotations").mkdir()
    shutil.copy(_data("anno1.png"), tmp_path / "same_stem_annotations" / "a.png")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "out_dir").mkdir()
    return tmp_path


IM, ANNO, IM2 = "<data>/im1.png", "<data>/anno1.png", "<data>/im2.png"
BAD = [
    ([IM, "-o", "o.png"], "give either ANNOTATION or --probs"),
    ([IM, ANNO, "--probs", "probs_hwl.npy", "-o", "o.png"], "not both"),
    (["missing.png", ANNO, "-o", "o.png"], "image missing.png: no such file"),
    ([IM, "missing.png", "-o", "o.png"], "ANNOTATION missing.png: no such file"),
    ([IM, "--probs", "missing.npy", "-o", "o.png"], "--probs missing.npy: no such file"),
    (["text.png", ANNO, "-o", "o.png"], "image text.png: cannot read it as an image"),
    ([IM, "text.png", "-o", "o.png"], "annotation text.png: cannot read it as an image"),
    ([IM, "--probs", "text.npy", "-o", "o.png"], "--probs text.npy: cannot read it as a .npy array"),
    ([IM2, ANNO, "-o", "o.png"], "anno1.png: is 320x240 (W x H) but image"),
    ([IM, "--probs", "probs_small.npy", "-o", "o.png"], "has shape (3, 239, 320) but the image is 240x320"),
    ([IM, "--probs", "probs_hwl.npy", "-o", "o.png"], "i.e. (H, W, L); fastseg crf takes (L, H, W)"),
    ([IM, "--probs", "logits.npy", "-o", "o.png"], "probabilities must lie in [0, 1]"),
    ([IM, "--probs", "one_label.npy", "-o", "o.png"], "has 1 label; a CRF needs at least 2"),
    ([IM, "--probs", "nan.npy", "-o", "o.png"], "contains non-finite values"),
    ([IM, "one_colour.png", "-o", "o.png"], "has 1 non-black colour(s); it needs at least 2 labels"),
    ([IM, "black.png", "-o", "o.png"], "has 0 non-black colour(s)"),
    ([IM, ANNO, "-o", "missing_dir/o.png"], "missing_dir does not exist"),
    ([IM, ANNO, "-o", "a_file/o.png"], "a_file does not exist"),
    ([IM, ANNO, "-o", "out_dir"], "-o out_dir is a directory"),
    ([IM, ANNO, "-o", "o.png", "--gt-prob", "1.5"], "--gt-prob must be in (0, 1)"),
    ([IM, ANNO, "-o", "o.png", "--srgb", "0"], "--srgb must be > 0"),
    ([IM, ANNO, "-o", "o.png", "--sxy-gaussian", "-3"], "--sxy-gaussian must be > 0"),
    ([IM, ANNO, "-o", "o.png", "--compat-bilateral", "nan"], "--compat-bilateral must be finite"),
    ([IM, ANNO, "-o", "o.png", "--iterations", "-1"], "--iterations must be >= 0"),
    (["images", "annotations", "-o", "out"], "annotations/photo.png: no such file (needed for images/photo.png)"),
    (["images", ANNO, "-o", "out"], "so ANNOTATION must be one too"),
    ([IM, "annotations", "-o", "o.png"], "ANNOTATION annotations is a directory but IMAGE"),
    (["annotations", "annotations", "-o", "out"], "no image files"),
    (["images", "images", "-o", "a_file"], "-o a_file is a file"),
    ([IM, ANNO, "-o", "o.jpg"], "-o o.jpg: the output is written as PNG"),
    ([IM, ANNO, "-o", "o"], "give a name ending in .png"),
    (["im.png", "anno.png", "-o", "anno.png"], "-o anno.png: is the input anno.png; refusing to overwrite"),
    (["im.png", "anno.png", "-o", "im.png"], "-o im.png: is the input im.png"),
    (["images", "images", "-o", "images"], "-o images/photo.png: is the input images/photo.png"),
    (["same_stem", "same_stem_annotations", "-o", "out"], "same_stem/a.jpg and same_stem/a.png would both be written to out/a.png"),
    ([IM, IM, "-o", "o.png"], "distinct non-black colours, so as many labels; at most 256"),
    (["float.tif", ANNO, "-o", "o.png"], "image float.tif: is a floating-point image"),
    ([IM, "float.tif", "-o", "o.png"], "annotation float.tif: is a floating-point image"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input(bad, capsys, monkeypatch, args, message):
    monkeypatch.chdir(bad)
    args = [a.replace("<data>", str(DATA)) for a in args]
    assert main(["crf", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastseg crf: "), err
    assert message in err
    assert not (bad / "o.png").exists() and not (bad / "out").exists()
    assert (bad / "anno.png").read_bytes() == _data("anno1.png").read_bytes()


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root may write anywhere")
def test_bad_input_unwritable(bad, capsys):
    (bad / "locked").mkdir(mode=0o500)
    assert main(["crf", str(_data("im1.png")), str(_data("anno1.png")), "-o", str(bad / "locked" / "o.png")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_bad_input_exit_status(tmp_path):
    result = _fastseg_crf(_data("im1.png"), _data("anno2.png"), "-o", tmp_path / "o.png")
    assert result.returncode == 2
    assert result.stderr.startswith("fastseg crf: annotation ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_sixteen_bit_inputs(tmp_path):
    """16-bit PNGs: a grey photo is scaled to 8 bits (not clipped to white), and a grey annotation's
    labels are its 16-bit values, written back at that depth."""
    grey = np.array(Image.open(_data("im1.png")).convert("L"))
    _, labels = np.unique(_rgb(_data("anno1.png")), return_inverse=True)
    labels = labels.reshape(grey.shape)  # 0 = black = unknown
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    levels8 = np.array([0, 40, 90, 200, 250], np.uint8)[: labels.max() + 1]
    levels16 = np.array([0, 1000, 300, 65535, 4000], np.uint16)[: labels.max() + 1]  # not sorted like levels8
    Image.fromarray(levels8[labels]).save(tmp_path / "anno8.png")
    Image.fromarray(levels16[labels]).save(tmp_path / "anno16.png")
    assert Image.open(tmp_path / "grey16.png").mode == Image.open(tmp_path / "anno16.png").mode == "I;16"
    assert main(["crf", str(tmp_path / "grey8.png"), str(tmp_path / "anno8.png"), "-o", str(tmp_path / "out8.png")]) == 0
    assert main(["crf", str(tmp_path / "grey16.png"), str(tmp_path / "anno16.png"), "-o", str(tmp_path / "out16.png"),
                 "--overlay"]) == 0
    out8, out16 = Image.open(tmp_path / "out8.png"), Image.open(tmp_path / "out16.png")
    assert out8.mode == "L" and out16.mode == "I;16"
    to_label8 = {int(v): i for i, v in enumerate(levels8)}
    to_label16 = {int(v): i for i, v in enumerate(levels16)}
    refined8 = np.vectorize(to_label8.get)(np.array(out8))
    refined16 = np.vectorize(to_label16.get)(np.array(out16))
    np.testing.assert_array_equal(refined16, refined8)
    assert len(np.unique(refined8)) == labels.max()  # every annotated label survives; none is unknown
    assert Image.open(tmp_path / "out16_overlay.png").size == (3 * grey.shape[1], grey.shape[0])
