"""Fault injection on the command line's files: a full disk, read-only places, clashes, truncated and
bit-flipped images and bundles, hostile card fields. Nothing is lost, nothing succeeds silently.

A full disk and a read-only file system are real small tmpfs mounts where this process may mount
(CI runs as root); elsewhere the full disk is a writer that fails on purpose and read-only is skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import oblique_image, tiny_bundle

from IDEALTrain.cli import main
from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import read_image, write_image
from IDEALTrain.model.bundle import save_bundle


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    except OSError:  # no mount command
        return False
    return result.returncode == 0


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder holding one good file, ``old.nii.gz``, on a disk with no space left."""
    folder = tmp_path / "disk"
    mounted = _mount(folder, "size=256k")
    try:
        write_image(oblique_image(), folder / "old.nii.gz")
        if mounted:
            with open(folder / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        else:  # no mount allowed: ITK's NIfTI writer on a full disk leaves an empty file and raises nothing
            real = sitk.WriteImage

            def full(image, name, *args, **kwargs):
                if folder in Path(name).parents:
                    Path(name).write_bytes(b"")
                else:
                    real(image, name, *args, **kwargs)

            monkeypatch.setattr(sitk, "WriteImage", full)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "read-only"
    if not _mount(folder, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_bundle(tiny_bundle(), tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def image(tmp_path):
    return write_image(oblique_image(), tmp_path / "image.nii.gz")


def run(capsys, *args) -> tuple[int, str]:
    """Exit status and the stderr of one in-process ``idealtrain`` command."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip()


def one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    assert err.startswith("idealtrain: error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- item 1: a full disk is an error, and the old file survives --------------------------------------------
def test_a_full_disk_keeps_the_old_output_and_exits_2(full_disk, model, image, capsys):
    old = (full_disk / "old.nii.gz").read_bytes()
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", full_disk / "old.nii.gz", "--overwrite")
    one_line_error(status, err, "old.nii.gz")
    assert (full_disk / "old.nii.gz").read_bytes() == old
    assert np.array_equal(read_image(full_disk / "old.nii.gz").array, oblique_image().array)
    assert not [name for name in entries(full_disk) if name.startswith(".")]  # no temporary file left


def test_a_full_disk_fails_the_uncertainty_map_and_phantoms_too(full_disk, model, image, tmp_path, capsys):
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", tmp_path / "labels.nii.gz",
                      "--uncertainty", full_disk / "uncertainty.nii.gz")
    one_line_error(status, err, "uncertainty.nii.gz")
    assert "uncertainty.nii.gz" not in entries(full_disk)
    status, err = run(capsys, "phantom", "--out", full_disk / "phantoms", "--cases", "1")
    one_line_error(status, err)


def test_the_writer_verifies_what_it_wrote(tmp_path, monkeypatch):
    """A writer that stops half-way (a disk failing mid-file) is caught by the read-back before the rename."""
    good = write_image(oblique_image(), tmp_path / "a.nrrd")
    before = good.read_bytes()
    real = sitk.WriteImage

    def half(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", half)
    with pytest.raises(IdealError, match="truncated"):
        write_image(oblique_image(seed=1), good)
    assert good.read_bytes() == before and entries(tmp_path) == ["a.nrrd"]


# -- item 2 and 6: clashes and unusable places are refused before any work -------------------------------
def test_uncertainty_and_labels_on_one_path_are_refused(model, image, tmp_path, capsys):
    target = tmp_path / "x.nii.gz"
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", target, "--uncertainty", target)
    one_line_error(status, err, "same file")
    assert not target.exists()


def test_read_only_folders_are_one_line_errors(read_only, model, image, capsys):
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", read_only / "x.nii.gz")
    one_line_error(status, err, "cannot write there", "Read-only")
    # training refuses before it reads any data (the data spec below does not even exist)
    status, err = run(capsys, "train", "--data", "folder:/no/such/data", "--iterations", "1", "--out", read_only / "model")
    one_line_error(status, err, "cannot write there")


def test_a_parent_that_is_a_file_is_one_line(model, image, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", tmp_path / "file" / "x.nii.gz")
    one_line_error(status, err, "is a file, not a folder")
    status, err = run(capsys, "train", "--data", "folder:/no/such/data", "--iterations", "1", "--out", tmp_path / "m",
                      "--checkpoint-dir", tmp_path / "file")
    one_line_error(status, err, "--checkpoint-dir", "is a file, not a folder")


# -- item 5: nothing is overwritten without --overwrite -----------------------------------------------------
def test_phantom_and_evaluate_never_overwrite(model, tmp_path, capsys):
    assert run(capsys, "phantom", "--out", tmp_path / "p", "--cases", "1")[0] == 0
    before = {p: p.read_bytes() for p in (tmp_path / "p").rglob("*.nii.gz")}
    one_line_error(*run(capsys, "phantom", "--out", tmp_path / "p", "--cases", "2"), "already exists", "--overwrite")
    assert {p: p.read_bytes() for p in (tmp_path / "p").rglob("*.nii.gz")} == before
    results = tmp_path / "results.json"
    results.write_text("{}")
    one_line_error(*run(capsys, "evaluate", "--model", model, "--data", f"folder:{tmp_path / 'p'}", "--out", results), "already exists")
    assert results.read_text() == "{}"


# -- item 4 and bundles: truncated and bit-flipped files are refused ----------------------------------------
# Not the bit-flipped .nii: an uncompressed NIfTI has no checksum, so a flipped bit is a valid image
# (docs/reliability.md says so).
DAMAGED = [(suffix, "truncated") for suffix in (".nii.gz", ".nii", ".nrrd", ".mha")] + [
    (suffix, "bit-flipped") for suffix in (".nii.gz", ".nrrd", ".mha")
]


@pytest.mark.parametrize(("suffix", "damage"), DAMAGED)
def test_damaged_images_are_refused(model, tmp_path, capsys, suffix, damage):
    path = write_image(oblique_image(), tmp_path / f"image{suffix}")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) * 2 // 3] ^= 0x10
    path.write_bytes(bytes(data))
    status, err = run(capsys, "segment", "--model", model, "--input", path, "--output", tmp_path / "out.nii.gz")
    one_line_error(status, err, str(path))
    assert any(word in err for word in ("truncated", "corrupt")), err
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "zeroed, checksum emptied"])
def test_damaged_bundles_are_refused(tmp_path, capsys, damage):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    weights = bytearray((path / "model.safetensors").read_bytes())
    if damage == "truncated":
        weights = weights[: len(weights) // 2]
    elif damage == "bit-flipped":
        weights[-10] ^= 0x01
    else:
        weights[-200:] = bytes(200)
        card = json.loads((path / "card.json").read_text())
        card["weights"]["sha256"] = ""
        (path / "card.json").write_text(json.dumps(card))
    (path / "model.safetensors").write_bytes(bytes(weights))
    one_line_error(*run(capsys, "bundle", "info", path), "checksum")


@pytest.mark.parametrize(
    "field,value",
    [("version", 5), ("format_version", "1"), ("labels", "RV,LV"), ("architecture", {"depth": "deep"}),
     ("id", ["a"]), ("preprocessing", {"inplane": 3, "size": "x"}), ("labels", [{"value": "one"}])],
)
def test_hostile_card_fields_are_one_line(tmp_path, capsys, field, value):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    card = json.loads((path / "card.json").read_text())
    card[field] = value  # the weights checksum stays valid: only the card lies
    (path / "card.json").write_text(json.dumps(card))
    one_line_error(*run(capsys, "bundle", "info", path), str(path))


def test_a_card_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    (path / "card.json").write_bytes((path / "card.json").read_bytes().replace(b'"tiny-test"', b'"tiny-\xff"'))
    one_line_error(*run(capsys, "bundle", "info", path), "not UTF-8")


# -- item 8: .mhd writes a header and its data file under their own names -----------------------------------
def test_mhd_output_is_a_proper_pair_and_overwrite_leaves_no_orphan(model, image, tmp_path, capsys):
    out = tmp_path / "out"
    for extra in ([], ["--overwrite"]):
        assert run(capsys, "segment", "--model", model, "--input", image, "--output", out / "seg.mhd", *extra)[0] == 0
        assert entries(out) == ["seg.mhd", "seg.zraw"]
    assert "ElementDataFile = seg.zraw" in (out / "seg.mhd").read_text()
    assert read_image(out / "seg.mhd").array.shape == oblique_image().array.shape


# -- item 10: the smaller defects ---------------------------------------------------------------------------
def test_outputs_get_ordinary_permissions(model, image, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run(capsys, "segment", "--model", model, "--input", image, "--output", tmp_path / "x.seg.nrrd")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "x.seg.nrrd").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("values,message", [
    ((np.nan,), "every voxel is NaN"),
    ((np.nan, 1.0, 2.0), "voxels are NaN"),
])
def test_nan_volumes_are_reported_as_nan(model, tmp_path, capsys, values, message):
    array = np.resize(np.array(values, np.float32), (6, 32, 32))
    path = write_image(Image(array), tmp_path / "nan.nii.gz")
    one_line_error(*run(capsys, "segment", "--model", model, "--input", path, "--output", tmp_path / "o.nii.gz"), message)


def test_small_argument_defects(tmp_path, capsys):
    one_line_error(*run(capsys, "phantom", "--out", tmp_path / "p", "--cases", "0"), "--cases must be at least 1")
    assert not (tmp_path / "p").exists()
    one_line_error(*run(capsys, "train", "--data", "folder:/x", "--iterations", "0", "--out", tmp_path / "m"),
                   "--iterations must be at least 1")


@pytest.mark.parametrize("value,message", [(2.5, "non-integer values (e.g. 2.5)"), (-1, "found -1..")])
def test_bad_label_values_name_the_file_and_the_value(tmp_path, capsys, value, message):
    assert run(capsys, "phantom", "--out", tmp_path / "d", "--cases", "1")[0] == 0
    label_path = tmp_path / "d" / "labels" / "phantom_0000.nii.gz"
    label = read_image(label_path)
    array = label.array.astype(np.float32)
    array[0, 0, 0] = value
    write_image(label.with_array(array), label_path)
    status, err = run(capsys, "train", "--data", f"folder:{tmp_path / 'd'}", "--iterations", "1", "--out", tmp_path / "m")
    one_line_error(status, err, str(label_path), message)
