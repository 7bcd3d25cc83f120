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


# -- issue 27: the output guard, non-finite and zero-spacing inputs, bounded clicks, full disks -------------
@pytest.fixture
def no_space(tmp_path):
    """A real tmpfs with no space left (skipped where this process may not mount)."""
    folder = tmp_path / "nospace"
    if not _mount(folder, "size=128k"):
        pytest.skip("cannot mount a tmpfs here (not root): a full disk needs a real one for this writer")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as handle, pytest.raises(OSError):
        while True:
            handle.write(b"\0" * 4096)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_that_resolves_to_an_input_is_refused_even_with_overwrite(model, image, tmp_path, capsys):
    scan = image.read_bytes()
    os.link(image, tmp_path / "hard.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(image)
    for output in (image, tmp_path / "sub" / ".." / "image.nii.gz", tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz"):
        status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", output, "--overwrite")
        one_line_error(status, err, "would replace the input")
    draft = write_image(oblique_image().with_array(np.zeros((7, 40, 48), np.uint8)), tmp_path / "draft.nii.gz")
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"clicks": []}))
    for output in (image, draft):
        status, err = run(capsys, "refine", "--model", model, "--input", image, "--draft", draft, "--clicks", clicks,
                          "--output", output, "--overwrite")
        one_line_error(status, err, "would replace the input")
    assert image.read_bytes() == scan and json.loads(clicks.read_text()) == {"clicks": []}


def test_train_refiner_never_replaces_its_model_however_spelt(tmp_path, capsys):
    from helpers import tiny_refinement_bundle

    segmentation = tiny_bundle()
    model = save_bundle(segmentation, tmp_path / "m")
    save_bundle(tiny_refinement_bundle(segmentation), model / "refinement")
    before = tree(model)
    (tmp_path / "alias").symlink_to(model)
    for out in (tmp_path / "m" / ".." / "m", tmp_path / "alias", tmp_path):
        status, err = run(capsys, "train-refiner", "--model", tmp_path / "m" / ".." / "m", "--data", tmp_path / "no-data",
                          "--iterations", "1", "--out", out, "--overwrite")
        one_line_error(status, err, "would replace the input")
    assert tree(model) == before


@pytest.mark.parametrize("command", ["train", "train-refiner"])
def test_overwrite_replaces_only_a_bundle_never_a_folder_of_notes(model, tmp_path, capsys, command):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.csv").write_text("case,dice\n")
    extra = ["--data", "folder:/no/such/data"] if command == "train" else ["--model", model, "--data", "/no/such/data"]
    status, err = run(capsys, command, *extra, "--iterations", "1", "--out", notes, "--overwrite")
    one_line_error(status, err, "is not a model bundle")
    assert tree(notes) == {"results.csv": b"case,dice\n"}


def test_save_bundle_replaces_a_bundle_but_never_a_folder(tmp_path):
    old = save_bundle(tiny_bundle(seed=1), tmp_path / "model")
    assert save_bundle(tiny_bundle(seed=2), old, overwrite=True) == old
    assert entries(tmp_path) == ["model"]  # nothing hidden left beside it
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(IdealError, match="not a model bundle"):
        save_bundle(tiny_bundle(), tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


@pytest.mark.parametrize("values,message", [
    ((np.inf, 1.0, 2.0), "1 of 6144 voxels are infinite"),
    ((-np.inf, np.nan, 1.0, 2.0), "3072 of 6144 voxels are NaN or infinite (1536 NaN, 1536 +-inf)"),
])
def test_infinite_voxels_are_refused_with_their_count(model, tmp_path, capsys, values, message):
    array = np.resize(np.array([1.0, 2.0], np.float32), (6, 32, 32))
    flat = array.reshape(-1)
    if len(values) == 3:
        flat[0] = np.inf
    else:
        flat[:] = np.resize(np.array(values, np.float32), flat.size)
    path = write_image(Image(array), tmp_path / "inf.nii.gz")
    status, err = run(capsys, "segment", "--model", model, "--input", path, "--output", tmp_path / "o.nii.gz")
    one_line_error(status, err, message)
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("pixdim", [0.0, -1.5])
def test_zero_or_negative_nifti_spacing_is_refused(model, tmp_path, capsys, pixdim):
    path = write_image(oblique_image(dtype=np.int16), tmp_path / "scan.nii")
    header = bytearray(path.read_bytes())
    header[80:84] = np.float32(pixdim).tobytes()  # pixdim[1], the i spacing
    path.write_bytes(bytes(header))
    status, err = run(capsys, "segment", "--model", model, "--input", path, "--output", tmp_path / "o.nii.gz")
    one_line_error(status, err, "voxel spacing", "pixdim")


def test_an_upper_case_suffix_is_written_or_refused_before_inference(model, image, tmp_path, capsys):
    assert run(capsys, "segment", "--model", model, "--input", image, "--output", tmp_path / "x.NII.GZ")[0] == 0
    assert read_image(tmp_path / "x.NII.GZ").same_grid(read_image(image), tolerance=1e-5)
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", tmp_path / "x.MHA")
    one_line_error(status, err, "lower case")
    assert entries(tmp_path) == ["image.nii.gz", "x.NII.GZ"]


def test_labels_and_uncertainty_are_committed_together(full_disk, model, image, tmp_path, capsys):
    """The uncertainty map does not fit: neither file is written, an old pair stays a pair, and the message
    names the output (not a hidden temporary file) as a write failure (not as a broken input)."""
    labels = tmp_path / "labels.nii.gz"
    status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", labels,
                      "--uncertainty", full_disk / "old.nii.gz", "--overwrite")
    one_line_error(status, err, str(full_disk / "old.nii.gz"))
    assert ".idealtrain" not in err and "not a readable image" not in err
    assert not labels.exists()
    assert np.array_equal(read_image(full_disk / "old.nii.gz").array, oblique_image().array)
    assert not [name for name in entries(full_disk) if name.startswith(".")]
    assert not [name for name in entries(tmp_path) if name.startswith(".")]


def test_another_run_writing_the_same_new_output_is_refused(model, image, tmp_path, capsys):
    from IDEALTrain.io.output_guard import output_lock

    target = tmp_path / "out.nii.gz"
    held = output_lock(target).acquire()  # as a second process writing it would hold it
    try:
        status, err = run(capsys, "segment", "--model", model, "--input", image, "--output", target)
        one_line_error(status, err, "being written by another run", f"pid {os.getpid()}")
    finally:
        held.release()
    assert not target.exists()
    assert run(capsys, "segment", "--model", model, "--input", image, "--output", target)[0] == 0


def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path):
    """Without --overwrite the commit itself refuses an output another run finished in the meantime."""
    from IDEALTrain.io.output_guard import OutputSet

    target = tmp_path / "a.nii.gz"
    with pytest.raises(IdealError, match="already exists"), OutputSet([target], overwrite=False) as out:
        write_image(oblique_image(), out.staged(target))
        target.write_bytes(b"the other run's result")
    assert target.read_bytes() == b"the other run's result" and entries(tmp_path) == ["a.nii.gz"]


def test_leftovers_of_a_killed_run_are_reported_and_removed(model, image, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / f".idealtrain-{dead.pid}-seg-abc.nii.gz").write_bytes(b"half")
    (out / f".idealtrain-{dead.pid}-seg-xyz").mkdir()
    (out / f".idealtrain-{dead.pid}-seg-xyz" / "seg.nii.gz").write_bytes(b"staged")
    (out / ".idealtrain-lock-seg.nii.gz").write_bytes(str(dead.pid).encode())
    live = out / f".idealtrain-{os.getpid()}-other-run.nii.gz"  # a run still going: kept
    live.write_bytes(b"busy")
    capsys.readouterr()
    assert main(["segment", "--model", str(model), "--input", str(image), "--output", str(out / "seg.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "removed 3 leftover temporary file(s) of an interrupted run" in err, err
    assert entries(out) == [live.name, "seg.nii.gz"]


def test_a_bundle_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    from IDEALTrain.io.output_guard import sweep_leftovers

    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".idealtrain-{dead.pid}-model-abc"
    aside.mkdir()
    bundle = save_bundle(tiny_bundle(), aside / "replaced-model")
    card = (bundle / "card.json").read_text()
    assert sweep_leftovers(tmp_path) == [aside.name]
    assert entries(tmp_path) == ["model"] and (tmp_path / "model" / "card.json").read_text() == card


@pytest.mark.parametrize("document,message", [
    ('{"clicks": [{"point": [' + "9" * 400 + ', 0, 0], "label": 1}]}', "three finite numbers"),
    ("[" * 100000 + "]" * 100000, "nested more than"),
    ('{"clicks": [{"point": [1e400, 0, 0], "label": 1}]}', "three finite numbers"),
    ('{"clicks": [{"point": [0, 0, 0], "label": ' + "7" * 50 + "}]}", "label value 0-255"),
])
def test_hostile_clicks_files_are_one_line(model, image, tmp_path, capsys, document, message):
    draft = write_image(oblique_image().with_array(np.zeros((7, 40, 48), np.uint8)), tmp_path / "draft.nii.gz")
    (tmp_path / "clicks.json").write_text(document)
    status, err = run(capsys, "refine", "--model", model, "--input", image, "--draft", draft,
                      "--clicks", tmp_path / "clicks.json", "--output", tmp_path / "out.nii.gz")
    one_line_error(status, err, message)
    assert len(err) < 400


def test_an_infinite_click_radius_is_one_line(model, image, tmp_path, capsys):
    draft = write_image(oblique_image().with_array(np.zeros((7, 40, 48), np.uint8)), tmp_path / "draft.nii.gz")
    (tmp_path / "clicks.json").write_text(json.dumps({"clicks": [{"point": list(oblique_image().origin), "label": 1}]}))
    status, err = run(capsys, "refine", "--model", model, "--input", image, "--draft", draft, "--clicks", tmp_path / "clicks.json",
                      "--output", tmp_path / "out.nii.gz", "--radius-mm=inf", "--engine", "levelset")
    one_line_error(status, err, "refinement radius")
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """Training exits 2 with one line; the checkpoint it saved before the disk filled still resumes."""
    from IDEALTrain.training.checkpoint import load_checkpoint

    assert run(capsys, "phantom", "--out", tmp_path / "d", "--cases", "1")[0] == 0
    small = ["--data", f"folder:{tmp_path / 'd'}", "--size", "32", "--base-channels", "4", "--depth", "3",
             "--batch-size", "1", "--device", "cpu", "--checkpoint-every", "1", "--progress-json"]
    probe = tmp_path / "probe"
    assert run(capsys, "train", *small, "--iterations", "1", "--out", tmp_path / "m0", "--checkpoint-dir", probe)[0] == 0
    size = (probe / "last.safetensors").stat().st_size
    checkpoints = tmp_path / "checkpoints"
    if not _mount(checkpoints, f"size={(size * 3 // 2 // 4096 + 1) * 4096}"):  # room for one checkpoint, not two
        from safetensors import torch as safetensors_torch

        from IDEALTrain.training import checkpoint

        calls = []

        def full_after_one(tensors, name, metadata=None):
            calls.append(name)
            if len(calls) > 1:
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            safetensors_torch.save_file(tensors, name, metadata=metadata)

        monkeypatch.setattr(checkpoint, "save_file", full_after_one)
    try:
        status, err = run(capsys, "train", *small, "--iterations", "3", "--out", tmp_path / "m", "--checkpoint-dir", checkpoints)
        one_line_error(status, err, "No space left on device", "previous checkpoint is kept")
        assert load_checkpoint(checkpoints).iteration == 1
        assert entries(checkpoints) == ["last.safetensors"] and not (tmp_path / "m").exists()
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False, capture_output=True)


def test_a_full_disk_while_saving_a_bundle_is_one_line_and_keeps_the_old_one(no_space, tmp_path):
    from helpers import tiny_refinement_bundle

    segmentation = tiny_bundle()
    old = save_bundle(tiny_refinement_bundle(segmentation), no_space / "refinement")
    before = tree(old)
    fill(no_space)
    for target, overwrite in ((no_space / "refinement", True), (no_space / "new", False)):
        with pytest.raises(IdealError, match="No space left on device"):
            save_bundle(tiny_refinement_bundle(segmentation, seed=1), target, overwrite=overwrite)
    assert tree(old) == before and entries(no_space) == ["filler", "refinement"]


def test_a_full_disk_while_registering_is_one_line(no_space, tmp_path):
    pytest.importorskip("slicer", reason="the registry test needs slicer-core's Logic imports")
    from IDEALSegmentLib.registry import ModelRegistry

    bundle = save_bundle(tiny_bundle(), tmp_path / "trained")
    registry = ModelRegistry(user_dir=no_space / "models", shipped_dir=tmp_path / "none")
    (no_space / "models").mkdir()
    fill(no_space)
    with pytest.raises(IdealError, match="No space left on device"):
        registry.register(bundle)
    assert entries(no_space / "models") == []
