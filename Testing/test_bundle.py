"""Bundles round-trip, verify themselves and never unpickle anything."""
from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch
from helpers import tiny_bundle
from safetensors.torch import save as save_safetensors

from IDEALTrain.errors import IdealError
from IDEALTrain.model.bundle import load_bundle, read_card, save_bundle


def _evil_pickle(marker) -> bytes:
    """Protocol-0 pickle opcodes that call open(marker, 'w') when unpickled."""
    return f"c__builtin__\nopen\n(V{marker}\nVw\ntR.".encode()


@pytest.mark.parametrize("name", ["model", "model.zip"])
def test_round_trip_folder_and_zip(tmp_path, name):
    bundle = tiny_bundle()
    path = save_bundle(bundle, tmp_path / name)
    loaded = load_bundle(path)
    assert loaded.network == bundle.network and loaded.preprocessing == bundle.preprocessing
    assert loaded.labels == bundle.labels and loaded.model_id == "tiny-test"
    for key, tensor in bundle.weights.items():
        assert torch.equal(loaded.weights[key], tensor), key
    card = read_card(path)
    assert len(card["weights"]["sha256"]) == 64 and card["architecture"]["depth"] == 3


def test_half_precision_bundle_loads_as_float32(tmp_path):
    path = save_bundle(tiny_bundle(), tmp_path / "half", half_precision=True)
    assert read_card(path)["weights"]["dtype"] == "float16"
    loaded = load_bundle(path)
    assert all(t.dtype == torch.float32 for t in loaded.weights.values() if t.is_floating_point())


def test_folder_bundle_is_readable_by_others(tmp_path):
    path = save_bundle(tiny_bundle(), tmp_path / "model")
    assert path.stat().st_mode & 0o755 == 0o755  # not the owner-only mode of its staging folder


def test_existing_output_is_not_overwritten(tmp_path):
    save_bundle(tiny_bundle(), tmp_path / "m")
    with pytest.raises(IdealError, match="already exists"):
        save_bundle(tiny_bundle(seed=1), tmp_path / "m")


def test_pickle_file_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    for name in ("model.pt", "model.pth", "weights"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x02" + _evil_pickle(marker) if name == "weights" else _evil_pickle(marker))
        with pytest.raises(IdealError, match="pickle"):
            load_bundle(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "checkpoint.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _evil_pickle(marker))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(IdealError, match="pickle-based"):
        load_bundle(path)
    assert not marker.exists()


def test_pickle_in_place_of_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    (path / "model.safetensors").write_bytes(_evil_pickle(marker))
    card = json.loads((path / "card.json").read_text())
    card["weights"]["sha256"] = hashlib.sha256(_evil_pickle(marker)).hexdigest()  # a card that vouches for the pickle
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(IdealError, match="not a valid safetensors"):
        load_bundle(path)
    assert not marker.exists()


@pytest.mark.parametrize("checksum", ["", None, "abc", 0])
def test_a_card_without_a_valid_checksum_is_refused(tmp_path, checksum):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    (path / "model.safetensors").write_bytes(save_safetensors({"x": torch.zeros(3)}))  # zeroed weights
    card = json.loads((path / "card.json").read_text())
    card["weights"]["sha256"] = checksum
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(IdealError, match="no valid weights checksum"):
        load_bundle(path)


def test_truncated_or_corrupt_weights(tmp_path):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IdealError, match="checksum"):
        load_bundle(path)
    (path / "card.json").write_text("{not json")
    with pytest.raises(IdealError, match="not valid JSON"):
        load_bundle(path)


def test_mismatched_label_map_and_architecture(tmp_path):
    path = save_bundle(tiny_bundle(), tmp_path / "m")
    card = json.loads((path / "card.json").read_text())
    card["labels"] = card["labels"][:2]
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(IdealError, match="label map"):
        load_bundle(path)
    card = json.loads((path / "card.json").read_text())
    card["labels"] = json.loads(json.dumps(tiny_bundle().card()["labels"]))
    card["architecture"]["base_channels"] = 8
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(IdealError, match="architecture"):
        load_bundle(path)


def test_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdealError, match="no card.json"):
        load_bundle(tmp_path / "empty")
    with pytest.raises(IdealError, match="no such model bundle"):
        load_bundle(tmp_path / "absent")


def test_bundle_edit_keeps_the_click_to_fix_network(tmp_path, capsys):
    """An edited copy of a model lost its refinement/ network; now it comes along verified (a .zip says it cannot)."""
    from helpers import tiny_refinement_bundle

    from IDEALTrain.cli import main
    from IDEALTrain.model.card import REFINEMENT_FOLDER, read_card

    model = save_bundle(tiny_bundle(), tmp_path / "model")
    save_bundle(tiny_refinement_bundle(tiny_bundle()), model / REFINEMENT_FOLDER)
    assert main(["bundle", "edit", str(model), "--out", str(tmp_path / "edited"), "--version", "2.0.0"]) == 0
    assert read_card(tmp_path / "edited" / REFINEMENT_FOLDER) == read_card(model / REFINEMENT_FOLDER)
    capsys.readouterr()
    assert main(["bundle", "edit", str(model), "--out", str(tmp_path / "edited.zip")]) == 0
    assert "cannot hold refinement/" in capsys.readouterr().err
    (model / REFINEMENT_FOLDER / "model.pt").write_bytes(b"\x80\x04 a pickle")
    assert main(["bundle", "edit", str(model), "--out", str(tmp_path / "again")]) == 2
    assert "pickle" in capsys.readouterr().err and not (tmp_path / "again").exists()
