"""The README's clinical path on the shipped sample, end to end: the block of "From a scan to a retrained model,
on the sample" is read from README.md and run through ``IDEALTrain.cli.main`` with a 2-iteration training budget
(segment -> measure -> refine -> export-corrections -> finetune --preset continue -> segment with the new model)."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np

from IDEALTrain.cli import main
from IDEALTrain.io.corrections import read_manifest
from IDEALTrain.io.volume_files import read_label
from IDEALTrain.model.bundle import load_bundle
from IDEALTrain.model.registry import DEFAULT_MODEL_ID, ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### From a scan to a retrained model, on the sample"
#: what keeps the run to seconds: the training budget, and the CPU for every command that runs a network
TINY = {"finetune": ["--iterations", "2", "--device", "cpu"], "segment": ["--device", "cpu"], "refine": ["--device", "cpu"]}


def readme_commands() -> list[list[str]]:
    """The shell lines of the README section's code block (continuations joined), split as a shell would."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(SECTION):]
    block = section.split("```")[1]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def summary(csv_path: Path) -> dict[str, float]:
    """The whole-heart figures of a measurement table CSV (its summary rows)."""
    with open(csv_path, newline="") as handle:
        return {row["name"]: float(row["value"]) for row in csv.DictReader(handle) if row["row_type"] == "summary"}


def test_the_readme_clinical_path_runs_on_the_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDEALSEGMENT_MODELS_DIR", str(tmp_path / "installed"))  # only the shipped model is installed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IDEALSegment").symlink_to(ROOT / "IDEALSegment")  # the README's paths are from the repository root
    commands = readme_commands()
    steps = [c[0] if c[0] == "echo" else c[1] for c in commands]
    assert steps == ["segment", "measure", "echo", "refine", "export-corrections", "finetune", "segment"], commands
    printed = {}
    for command in commands:
        if command[0] == "echo":  # echo 'JSON' > FILE
            assert command[2] == ">" and len(command) == 4, command
            Path(command[3]).write_text(command[1] + "\n")
            continue
        assert command[0] == "idealtrain", command
        args = command[1:] + TINY.get(command[1], [])
        assert main(args) == 0, args
        printed[command[1] if command[1] not in printed else command[1] + "2"] = capsys.readouterr().out
    case = tmp_path / "runs" / "case"

    # 1. segment: both frames' segmentations, the table and the report; measure on the written labels agrees
    draft = [read_label(case / f"case_frame0{f}.seg.nrrd").array for f in (0, 1)]
    assert all(d.shape == (12, 256, 256) and set(np.unique(d)) == {0, 1, 2, 3} for d in draft)
    table, measured = summary(case / "table.csv"), summary(case / "measure.csv")
    assert {"lv_edv_ml", "lv_esv_ml", "lv_ef_percent", "myocardial_mass_g"} <= set(table)
    assert table == measured and 10 < table["lv_ef_percent"] < 80
    for text in (f"LV EF {table['lv_ef_percent']:.1f} %", f"LV EDV {table['lv_edv_ml']:.1f} ml"):
        assert text in " ".join(printed["segment"].split()) and text in " ".join(printed["measure"].split())
    assert (case / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 2. refine: the clicked voxel becomes LV, and only voxels near the click change, on the ED frame only
    click = json.loads((case / "clicks.json").read_text())
    assert click["space"] == "ijk"
    i, j, k = click["clicks"][0]["point"]
    fixed = read_label(case / "fixed_frame01.seg.nrrd").array
    changed = np.argwhere(fixed != draft[1])
    assert draft[1][k, j, i] != 3 and fixed[k, j, i] == 3 and 10 <= len(changed) <= 2000, len(changed)
    assert np.abs(changed[:, 0] - k).max() <= 1 and np.abs(changed[:, 1:] - [j, i]).max() <= 30, changed
    assert f"{len(changed)} voxel(s) changed" in printed["refine"]

    # 3. export-corrections recorded only the edited structures, on the edited slices, and the cine for the pool
    entries = read_manifest(tmp_path / "runs" / "corrections")
    labeled = [e for e in entries if e["kind"] == "labeled"]
    assert [e["case_id"] for e in labeled] == ["SCD0000101_frame01"] and labeled[0]["patient_id"] == "SCD0000101"
    edited_slices = sorted({int(s) for s in changed[:, 0]})
    edited = {name for name, value in (("RV", 1), ("LV_Myocardium", 2), ("LV", 3))
              if ((fixed == value) != (draft[1] == value)).any()}
    assert "RV" not in edited and labeled[0]["reviewed"] == {name: edited_slices for name in edited}
    assert sorted(e["case_id"] for e in entries if e["kind"] == "unlabeled") == ["SCD0000101_scan_frame00", "SCD0000101_scan_frame01"]
    assert np.array_equal(read_label(tmp_path / "runs/corrections" / labeled[0]["files"]["label"]).array, fixed)

    # 4. finetune --preset continue: a new version of the shipped model, with its provenance and licence
    shipped = ModelRegistry().find(DEFAULT_MODEL_ID)
    model = tmp_path / "runs" / "my-model"
    bundle = load_bundle(model)  # verifies the weights' checksum
    card = json.loads((model / "card.json").read_text())
    assert bundle.model_id == DEFAULT_MODEL_ID and bundle.version != shipped.version
    assert card["description"].startswith(f"Retrained from {DEFAULT_MODEL_ID} {shipped.version} on folder:runs/corrections")
    training = card["training"]
    assert training["retrained_from"]["version"] == shipped.version and training["retrained_from"]["preset"] == "continue"
    assert training["retrained_from"]["bundle"] == str(shipped.path)  # the id on the command line, resolved
    assert training["recipe"]["iterations"] == 2 and training["recipe"]["crop_size"] == 128  # the preset, less the budget
    assert [(c["case_id"], c["reviewed"]) for c in training["corrections"]["cases"]] == [("SCD0000101_frame01", labeled[0]["reviewed"])]
    assert training["labeled_cases"] == 1 and training["unlabeled_cases"] == 2  # the reviewed frame; the cine as pool
    assert "LICENSE.txt" in training["carried_files"]
    assert (model / "LICENSE.txt").read_bytes() == (shipped.path / "LICENSE.txt").read_bytes()

    # 5. the last segment used the new model: same input and code, other labels (the old model is deterministic)
    again = [read_label(tmp_path / "runs" / "case2" / f"case_frame0{f}.seg.nrrd").array for f in (0, 1)]
    assert any((a != d).any() for a, d in zip(again, draft))
    assert "LV EF" in printed["segment2"]


def test_init_from_takes_an_installed_model_id_and_names_a_mistyped_one(tmp_path, monkeypatch, capsys):
    """--init-from resolves ids as --model does (the README's finetune line); a wrong id is one line naming the flag."""
    monkeypatch.setenv("IDEALSEGMENT_MODELS_DIR", str(tmp_path / "installed"))
    args = ["finetune", "--preset", "continue", "--init-from", "idealsegment-acdcc", "--labeled", f"folder:{tmp_path}",
            "--out", str(tmp_path / "model"), "--iterations", "1"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("idealtrain: error: --init-from idealsegment-acdcc: no such bundle folder") and "installed: idealsegment-acdc" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "model").exists()
