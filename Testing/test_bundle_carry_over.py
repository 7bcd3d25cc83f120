"""Issue 31: a retrained model keeps every file of the shipped bundle (LICENSE.txt: derived models carry CC BY-NC-SA and
the ACDC citation; refinement/), through ``finetune --init-from`` and the registry's *Use this model*."""
from __future__ import annotations

import hashlib
from pathlib import Path

from helpers import import_slicer_core

from IDEALTrain.cli import main
from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.io.sample_data import default_model_dir
from IDEALTrain.io.volume_files import write_image
from IDEALTrain.model.bundle import read_card
from IDEALTrain.model.card import OWN_ENTRIES

slicer = import_slicer_core()

from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402


def files(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under a bundle folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_file_of_the_shipped_bundle_survives_finetune_and_register(tmp_path):
    shipped = default_model_dir()
    listed = files(shipped)
    assert "LICENSE.txt" in listed and any(name.startswith("refinement/") for name in listed)
    image, label = make_phantom(0, size=(40, 40, 3), spacing=(2.0, 2.0, 8.0))
    write_image(image, tmp_path / "scan.nii.gz")
    write_image(label, tmp_path / "labels.nii.gz")
    data = tmp_path / "corrections"
    assert main(["export-corrections", "--image", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                 "--structures", "LV", "--out", str(data)]) == 0
    retrained = tmp_path / "retrained"
    assert main(["finetune", "--preset", "continue", "--labeled", f"folder:{data}", "--init-from", str(shipped),
                 "--iterations", "1", "--batch-size", "1", "--unlabeled-batch-size", "1", "--out", str(retrained), "--device", "cpu"]) == 0
    registered = ModelRegistry(tmp_path / "user", tmp_path / "none").register(retrained).path
    for bundle in (retrained, registered):
        copied = files(bundle)
        for name, digest in listed.items():
            if name in OWN_ENTRIES:  # deliberately replaced: the new card and the new weights
                assert copied[name] != digest, f"{bundle}: {name} was not rewritten"
            else:
                assert copied.get(name) == digest, f"{bundle}: {name} is missing or changed"
    card, old = read_card(registered), read_card(shipped)
    assert card["licence"] == old["licence"] and card["id"] == old["id"] and card["version"] != old["version"]
    assert "LICENSE.txt" in card["training"]["carried_files"] and card["description"].startswith(f"Retrained from {old['id']} {old['version']}")
