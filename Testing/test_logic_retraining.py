"""Retraining from reviewed cases (IDEALSegmentLib.retraining): the split, the idealtrain plan, old vs new, the table.

Corrections data sets are exported from real MRML nodes (slicer-core); models are tiny bundles; the
planned arguments are parsed by idealtrain's own parser to check they rebuild the old model.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import import_slicer_core, tiny_bundle

slicer = import_slicer_core()

from IDEALSegmentLib import retraining  # noqa: E402
from IDEALSegmentLib.corrections import add_unlabeled_volume, export_correction  # noqa: E402
from IDEALSegmentLib.registry import ModelEntry  # noqa: E402
from IDEALSegmentLib.retraining import (  # noqa: E402
    CONTINUE,
    FINETUNE_PHASE,
    PRETRAIN_PHASE,
    carried_flags,
    estimate_text,
    prepare_run,
    split_cases,
    training_plan,
)
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402

from IDEALTrain.cli import build_parser  # noqa: E402
from IDEALTrain.cli.train import network_and_plan  # noqa: E402
from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.datasets import load_cases  # noqa: E402
from IDEALTrain.io.phantom import make_phantom  # noqa: E402
from IDEALTrain.io.volume_files import read_image  # noqa: E402
from IDEALTrain.model.bundle import Bundle, read_card, save_bundle  # noqa: E402
from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork  # noqa: E402
from IDEALTrain.model.postprocessing import Postprocessing  # noqa: E402
from IDEALTrain.model.preprocessing import Preprocessing  # noqa: E402
from IDEALTrain.training.partial_labels import PARTIAL, UNLABELLED, class_set_value  # noqa: E402

CASES = [f"case{number}" for number in range(6)]


def write_corrections(folder: Path, case_ids, pool: int = 1) -> Path:
    """A corrections data set exported from MRML nodes: small phantoms as reviewed cases, plus a pool."""
    scene = slicer.vtkMRMLScene()
    for seed, case_id in enumerate(case_ids):
        image, label = make_phantom(seed, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
        volume = volume_from_image(image, scene, case_id)
        export_correction(folder, volume, segmentation_from_labels(label, volume), case_id=case_id, reviewer="test")
    for number in range(pool):
        image, _ = make_phantom(100 + number, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
        add_unlabeled_volume(folder, volume_from_image(image, scene, f"pool{number}"))
    return folder


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: relative path -> (SHA-256, modification time)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corrections(tmp_path_factory) -> Path:
    return write_corrections(tmp_path_factory.mktemp("data") / "corrections", CASES)


def entry(bundle: Bundle, folder: Path, version: str = "1.2.0") -> ModelEntry:
    """A saved bundle as the registry would list it."""
    bundle.model_id, bundle.version = "heart", version
    path = save_bundle(bundle, folder / f"heart-{version}")
    return ModelEntry("heart", version, path, "user", read_card(path))


def idealtrain_like(base: int = 4, depth: int = 3, decoders=("unet",)) -> Bundle:
    """An untrained bundle whose architecture and preprocessing idealtrain's options can rebuild."""
    config = NetworkConfig(base_channels=base, depth=depth, decoders=decoders)
    plan = Preprocessing(inplane="spacing", size=(32, 32), spacing=(2.0, 2.0))
    return Bundle(config, plan, SegmentationNetwork(config).state_dict())


def encoder_bundle(folder: Path, base: int) -> Path:
    config = NetworkConfig(base_channels=base, depth=3)
    weights = {k: v for k, v in SegmentationNetwork(config).state_dict().items() if k.startswith("encoder.")}
    return save_bundle(Bundle(config, Preprocessing(), weights, kind="pretrained-encoder"), folder / f"encoder-{base}")


# -- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "count, held_out",
    [(1, []), (2, []), (3, ["c3"]), (4, ["c4"]), (5, ["c5"]), (9, ["c5"]), (10, ["c5", "c10"]), (12, ["c5", "c10"])],
)
def test_split_holds_out_every_fifth_case_or_the_last(count, held_out):
    ids = [f"c{number}" for number in range(1, count + 1)]
    train, held = split_cases(ids)
    assert held == held_out
    assert train == [case for case in ids if case not in held_out]


def test_split_refuses_holding_out_everything():
    with pytest.raises(IdealError, match="at least 2"):
        split_cases(["a", "b", "c"], hold_out_every=1)


def test_prepare_run_copies_the_split_and_leaves_the_dataset_untouched(corrections, tmp_path):
    before = snapshot(corrections)
    run = prepare_run(corrections, tmp_path / "run")
    assert run.train_cases == ("case0", "case1", "case2", "case3", "case5")
    assert run.held_out_cases == ("case4",)
    # The run's pool: the data set's pool (the scans behind the reviewed cases joined it at export) less the held-out patient's.
    assert run.unlabeled_dir == tmp_path / "run" / "unlabeled"
    pooled = sorted(p.name for p in (run.unlabeled_dir / "images").iterdir())
    assert pooled == sorted([f"{case}_scan.nii.gz" for case in run.train_cases] + ["pool0.nii.gz"])
    assert run.held_out_dir == tmp_path / "run" / "held_out" and run.train_dir == tmp_path / "run" / "train"
    for folder, ids in ((run.train_dir, run.train_cases), (run.held_out_dir, run.held_out_cases)):
        for kind in ("images", "labels"):
            assert sorted(p.name for p in (folder / kind).iterdir()) == sorted(f"{case}.nii.gz" for case in ids)
            for case in ids:
                copied, original = folder / kind / f"{case}.nii.gz", corrections / kind / f"{case}.nii.gz"
                if (folder, kind) == (run.train_dir, "labels"):  # every structure reviewed where present: labels kept there
                    train, source = read_image(copied).array, read_image(original).array
                    assert np.array_equal(train[train < PARTIAL], source[train < PARTIAL]) and np.array_equal(train[source > 0], source[source > 0])
                else:
                    assert copied.read_bytes() == original.read_bytes()
    assert [case.name for case in load_cases(f"folder:{run.held_out_dir}", require_labels=True)] == ["case4"]
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["train_cases"] == list(run.train_cases) and record["held_out_cases"] == ["case4"]
    assert snapshot(corrections) == before


def test_split_keeps_each_patients_cases_together():
    ids = [f"{patient}_{phase}" for patient in ("p1", "p2", "p3", "p4") for phase in ("ed", "es")]
    patients = {case: case.split("_")[0] for case in ids}
    train, held = split_cases(ids, patients=patients)
    assert held == ["p4_ed", "p4_es"] and train == ids[:6]  # 4 patients: the last patient, both frames
    assert split_cases(ids[:4], patients=patients) == (ids[:4], [])  # 2 patients: nothing can be held out
    five = ids + ["p5_ed", "p6_ed"]
    assert split_cases(five, patients=patients | {"p5_ed": "p5", "p6_ed": "p6"})[1] == ["p5_ed"]  # the 5th patient


def test_prepare_run_trains_only_where_reviewed_and_records_the_corrections(tmp_path):
    """Unreviewed voxels never act as labels: unreviewed slices are unlabelled, an unreviewed RV is 'not LV' only."""
    scene = slicer.vtkMRMLScene()
    data = tmp_path / "data"
    for number, patient in enumerate(("p1", "p1", "p2", "p3")):
        image, label = make_phantom(number, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
        volume = volume_from_image(image, scene, f"c{number}")
        export_correction(data, volume, segmentation_from_labels(label, volume), case_id=f"c{number}", reviewer=f"dr {patient}",
                          reviewed_structures={"LV": [1]}, patient_id=patient)
    run = prepare_run(data, tmp_path / "run")
    assert run.train_cases == ("c0", "c1", "c2") and run.held_out_cases == ("c3",)  # patient p3 held out
    source, train = read_image(data / "labels" / "c0.nii.gz").array, read_image(run.train_dir / "labels" / "c0.nii.gz").array
    assert (train[[0, 2]] == UNLABELLED).all()  # slices nobody reviewed
    lv = source[1] == 3
    assert lv.any() and (source[1] == 1).any()
    assert (train[1][lv] == 3).all() and (train[1][~lv] == class_set_value([0, 1, 2])).all()  # the RV there is only "not LV"
    held = json.loads((run.held_out_dir / "manifest.json").read_text())
    assert [case["case_id"] for case in held["cases"]] == ["c3"] and held["cases"][0]["reviewed"] == {"LV": [1]}
    provenance = json.loads((run.run_dir / "corrections.json").read_text())
    assert [case["case_id"] for case in provenance["cases"]] == ["c0", "c1", "c2"]
    assert provenance["reviewers"] == ["dr p1", "dr p2"] and provenance["patients"] == 2
    assert all(case["structures"] == ["LV"] for case in provenance["cases"])


def test_prepare_run_with_few_cases_holds_nothing_out(tmp_path):
    data = write_corrections(tmp_path / "two", ["a", "b"], pool=0)
    run = prepare_run(data, tmp_path / "run")
    assert run.train_cases == ("a", "b") and run.held_out_cases == () and run.held_out_dir is None
    assert not (tmp_path / "run" / "held_out").exists()
    # Never supervised-only on the corrections alone unless chosen: the reviewed scans are the pool.
    assert sorted(p.name for p in (run.unlabeled_dir / "images").iterdir()) == ["a_scan.nii.gz", "b_scan.nii.gz"]
    [(_, arguments)] = training_plan(run, encoder="none", iterations=5)
    assert arguments[arguments.index("--unlabeled") + 1] == f"folder:{run.unlabeled_dir}"
    alone = prepare_run(data, tmp_path / "alone", pool=False)
    assert alone.unlabeled_dir is None and "--supervised-only" in training_plan(alone, encoder="none", iterations=5)[0][1]


def test_scans_of_old_data_sets_join_the_run_pool_too(tmp_path):
    """A data set exported without the automatic pool (older IDEALSegment): prepare_run adds the reviewed images themselves."""
    scene = slicer.vtkMRMLScene()
    image, label = make_phantom(3, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
    volume = volume_from_image(image, scene, "old")
    export_correction(tmp_path / "data", volume, segmentation_from_labels(label, volume), pool=False)
    run = prepare_run(tmp_path / "data", tmp_path / "run")
    assert [p.name for p in (run.unlabeled_dir / "images").iterdir()] == ["reviewed_old.nii.gz"]


def test_patients_come_from_the_subject_hierarchy_and_never_straddle_the_split(tmp_path):
    """Issue 31: SCD0000201_ED trained while SCD0000201_ES was held out. Patients now come from the subject hierarchy
    (where Slicer's DICOM import puts DICOM.PatientID), the frames of a cine share one patient without any id,
    their scans stay with their patient, and no patient is on both sides."""
    from IDEALSegmentLib.cine import sequence_from_images

    scene = slicer.vtkMRMLScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    data = tmp_path / "data"
    for number, patient in enumerate(("SCD0000101", "SCD0000201", "SCD0000301", "SCD0000401")):
        patient_item = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), f"Patient {number}")
        hierarchy.SetItemAttribute(patient_item, "DICOM.PatientID", patient)
        study = hierarchy.CreateStudyItem(patient_item, "cine study")
        for phase in ("ED", "ES"):
            image, label = make_phantom(10 * number + len(phase), size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
            volume = volume_from_image(image, scene, f"{patient}_{phase}")  # named like the frames, no patient attribute
            item = hierarchy.GetItemByDataNode(volume)  # Slicer makes the item itself; slicer-core does not
            hierarchy.SetItemParent(item, study) if item else hierarchy.CreateItem(study, volume)
            export_correction(data, volume, segmentation_from_labels(label, volume), reviewed_structures=["LV"])
    # A cine without any patient id: its frames are one patient (the cine's), and its scans join the pool once.
    base, base_label = make_phantom(50, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
    frames = [(base.with_array(base.array + k), base_label) for k in range(3)]
    cine = sequence_from_images(scene, [image for image, _ in frames], "anonymous cine")
    for k in (0, 2):
        volume = volume_from_image(frames[k][0], scene, f"anonymous frame {k}")
        export_correction(data, volume, segmentation_from_labels(frames[k][1], volume), scans=cine, reviewed_structures=["LV"])
    entries = {e["case_id"]: e for e in retraining.read_manifest(data)}
    assert entries["SCD0000201_ES"]["patient_id"] == entries["SCD0000201_ED"]["patient_id"] == "SCD0000201"
    assert entries["anonymous_frame_0"]["patient_id"] == entries["anonymous_frame_2"]["patient_id"] == "anonymous_cine"
    assert sorted(c for c, e in entries.items() if e["kind"] == "unlabeled" and e["patient_id"] == "anonymous_cine") == [
        f"anonymous_cine_scan_frame{k:02d}" for k in range(3)]  # the whole cine, once
    run = prepare_run(data, tmp_path / "run", hold_out_every=2)
    patient = {c: entries[c]["patient_id"] for c in run.train_cases + run.held_out_cases}
    held = {patient[c] for c in run.held_out_cases}
    assert held == {"SCD0000201", "SCD0000401"} and not held & {patient[c] for c in run.train_cases}
    assert sorted(run.held_out_cases) == ["SCD0000201_ED", "SCD0000201_ES", "SCD0000401_ED", "SCD0000401_ES"]
    pooled = {p.name for p in (run.unlabeled_dir / "images").iterdir()}
    assert not any(name.startswith(("SCD0000201", "SCD0000401")) for name in pooled)  # held-out scans never train
    assert {"SCD0000101_ED_scan.nii.gz", "anonymous_cine_scan_frame01.nii.gz"} <= pooled


def test_prepare_run_refuses_a_folder_with_content(corrections, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(IdealError, match="not an empty folder"):
        prepare_run(corrections, run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "mine"
    prepare_run(corrections, tmp_path / "empty")  # an empty or new folder is fine
    with pytest.raises(IdealError, match="not an empty folder"):
        prepare_run(corrections, tmp_path / "empty")


def test_prepare_run_refuses_data_without_reviewed_cases(tmp_path):
    with pytest.raises(IdealError, match="not a corrections data set"):
        prepare_run(tmp_path / "nothing", tmp_path / "run")
    pool_only = write_corrections(tmp_path / "pool", [], pool=1)
    with pytest.raises(IdealError, match="no reviewed cases"):
        prepare_run(pool_only, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_copy_leaves_the_run_folder_as_it_was(corrections, tmp_path, monkeypatch):
    copies = []

    def failing_copy(source, target):
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        copies.append(target)
        return shutil.copyfile(source, target)

    monkeypatch.setattr(retraining.shutil, "copy2", failing_copy)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(OSError, match="No space"):
        prepare_run(corrections, run_dir)
    assert len(copies) == 3 and run_dir.is_dir() and list(run_dir.iterdir()) == []
    with pytest.raises(OSError):
        prepare_run(corrections, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# -- the plan -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(corrections, tmp_path_factory):
    return prepare_run(corrections, tmp_path_factory.mktemp("plan") / "run")


def value(arguments, flag):
    assert arguments.count(flag) == 1, (flag, arguments)
    return arguments[arguments.index(flag) + 1]


def test_plan_rebuilds_the_old_models_architecture_and_preprocessing(run, tmp_path):
    old = entry(idealtrain_like(base=4, depth=3, decoders=("unet",)), tmp_path)
    plan = training_plan(run, encoder="pretrain", pretrain_iterations=7, iterations=9, label_budget=2, device="cpu", old_model=old)
    assert [phase for phase, _ in plan] == [PRETRAIN_PHASE, FINETUNE_PHASE]
    (_, pretrain), (_, finetune) = plan

    assert pretrain[0] == "pretrain" and "--decoders" not in pretrain
    assert [pretrain[i + 1] for i, a in enumerate(pretrain) if a == "--data"] == [f"folder:{run.train_dir}", f"folder:{run.unlabeled_dir}"]
    assert value(pretrain, "--iterations") == "7" and value(pretrain, "--out") == str(run.encoder)
    args = build_parser().parse_args(pretrain)
    network, preprocessing = network_and_plan(args)
    assert (network.base_channels, network.depth) == (4, 3)
    assert preprocessing == old_preprocessing(old)

    assert finetune[0] == "finetune"
    assert value(finetune, "--labeled") == f"folder:{run.train_dir}" and value(finetune, "--unlabeled") == f"folder:{run.unlabeled_dir}"
    assert value(finetune, "--pretrained") == str(run.encoder) and value(finetune, "--out") == str(run.bundle)
    assert value(finetune, "--iterations") == "9" and value(finetune, "--labeled-slices") == "2" and value(finetune, "--device") == "cpu"
    assert value(finetune, "--id") == "heart" and value(finetune, "--version") == "1.2.1"
    # The held-out cases are reported on live but never choose the checkpoint they are then compared on.
    assert value(finetune, "--val") == f"folder:{run.held_out_dir}" and value(finetune, "--keep") == "last"
    assert not any(str(run.run_dir / "held_out") in a for a in pretrain)
    args = build_parser().parse_args(finetune)
    network, preprocessing = network_and_plan(args)
    assert network == NetworkConfig.from_json(old.card["architecture"])
    assert preprocessing == old_preprocessing(old)


def old_preprocessing(old: ModelEntry) -> Preprocessing:
    return Preprocessing.from_json(old.card["preprocessing"])


def test_plan_without_an_old_model_uses_idealtrains_defaults(run):
    plan = training_plan(run, encoder="none", iterations=3)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE]
    arguments = plan[0][1]
    for flag in ("--base-channels", "--depth", "--decoders", "--inplane", "--id", "--pretrained"):
        assert flag not in arguments
    assert value(arguments, "--device") == "auto"


def test_plan_refuses_a_model_idealtrain_cannot_rebuild(run, tmp_path):
    old = entry(tiny_bundle(), tmp_path)  # fpn_channels 8 and no dropout: not what idealtrain's options make
    with pytest.raises(IdealError, match="cannot be retrained like-for-like.*fpn_channels 8"):
        training_plan(run, encoder="none", old_model=old)
    square = idealtrain_like()
    square.preprocessing = Preprocessing(inplane="size", size=(32, 64))
    with pytest.raises(IdealError, match=r"size \[32, 64\]"):
        training_plan(run, encoder="none", old_model=entry(square, tmp_path, "2.0.0"))


def test_plan_reuses_an_encoder_only_with_the_old_models_architecture(run, tmp_path):
    old = entry(idealtrain_like(base=4, depth=3), tmp_path)
    matching, wider = encoder_bundle(tmp_path, 4), encoder_bundle(tmp_path, 8)
    plan = training_plan(run, encoder="reuse", encoder_path=matching, old_model=old)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE] and value(plan[0][1], "--pretrained") == str(matching)
    with pytest.raises(IdealError, match="base_channels 8.*base_channels 4.*old model's architecture"):
        training_plan(run, encoder="reuse", encoder_path=wider, old_model=old)
    assert value(training_plan(run, encoder="reuse", encoder_path=wider)[0][1], "--pretrained") == str(wider)  # no old model
    with pytest.raises(IdealError, match="not a pretrained encoder"):
        training_plan(run, encoder="reuse", encoder_path=old.path, old_model=old)
    with pytest.raises(IdealError, match="choose the pretrained encoder"):
        training_plan(run, encoder="reuse", encoder_path=tmp_path / "missing")


def test_plan_keeps_the_old_models_postprocessing(run, tmp_path):
    cleaned = idealtrain_like()
    cleaned.postprocessing = Postprocessing(largest_heart_component=True)
    old = entry(cleaned, tmp_path, "3.0.0")
    arguments = training_plan(run, encoder="none", old_model=old)[0][1]
    assert value(arguments, "--largest-component") == "on"
    assert value(training_plan(run, encoder="none", old_model=entry(idealtrain_like(), tmp_path, "3.1.0"))[0][1], "--largest-component") == "off"


def test_plan_continues_the_old_model_from_its_weights(run, tmp_path):
    old = entry(tiny_bundle(), tmp_path, "4.0.0")  # not rebuildable from flags, but continuing needs no rebuild
    plan = training_plan(run, encoder="model", iterations=5, old_model=old)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE]
    arguments = plan[0][1]
    assert value(arguments, "--init-from") == str(old.path) and value(arguments, "--version") == "4.0.1"
    for flag in ("--pretrained", "--base-channels", "--inplane", "--largest-component"):
        assert flag not in arguments  # all of it comes with the model
    with pytest.raises(IdealError, match="continuing needs an old model"):
        training_plan(run, encoder="model")


def test_the_default_continue_plan_protects_against_forgetting_and_fits_minutes(run, tmp_path):
    old = entry(tiny_bundle(), tmp_path, "4.0.0")
    arguments = training_plan(run, encoder="model", old_model=old)[0][1]
    assert value(arguments, "--iterations") == str(CONTINUE.iterations)
    assert value(arguments, "--distill") == str(CONTINUE.distill) and float(CONTINUE.distill) > 0
    assert value(arguments, "--frozen-levels") == str(CONTINUE.frozen_levels) and value(arguments, "--crop") == str(CONTINUE.crop)
    assert value(arguments, "--provenance") == str(run.run_dir / "corrections.json")
    assert "--frozen-norm" in arguments and CONTINUE.frozen_norm
    assert "--supervised-only" not in arguments and value(arguments, "--unlabeled") == f"folder:{run.unlabeled_dir}"
    args = build_parser().parse_args(arguments)
    assert (args.distill, args.frozen_levels, args.crop, args.frozen_norm) == (CONTINUE.distill, CONTINUE.frozen_levels, CONTINUE.crop, True)
    assert args.keep_old == CONTINUE.keep_old and 0 < CONTINUE.keep_old < 1
    text = estimate_text(len(run.train_cases), 1)
    minutes, fp32 = (CONTINUE.estimate_seconds(len(run.train_cases) + 1, bf16=bf16) / 60 for bf16 in (True, False))
    assert f"about {max(1, round(minutes))} min for {CONTINUE.iterations} iterations" in text and "1 unlabelled" in text
    assert f"about {max(1, round(fp32))} min without bf16" in text and fp32 > minutes
    assert CONTINUE.estimate_seconds(4 + 100) <= 600  # the benchmark's case: 4 reviewed volumes and 100 cine frames
    assert CONTINUE.estimate_seconds(4 + 100, bf16=False) <= 600


def test_plan_refuses_bad_options(run):
    with pytest.raises(IdealError, match="unknown encoder start 'random'"):
        training_plan(run, encoder="random")
    with pytest.raises(IdealError, match="at least 1 iteration"):
        training_plan(run, encoder="none", iterations=0)
    with pytest.raises(IdealError, match="label budget"):
        training_plan(run, encoder="none", label_budget=-1)


def test_a_model_trained_anew_keeps_the_old_augmentation_and_float16_storage(run, tmp_path):
    card = {"training": {"recipe": {"augmentation": {"rotation_degrees": 180.0, "scale_range": [0.7, 1.4]}}},
            "weights": {"dtype": "float16"}}
    assert carried_flags(card) == ["--rotation", "180.0", "--scale-range", "0.7", "1.4", "--half"]
    assert carried_flags({"weights": {"dtype": "float32"}}) == []
    old = entry(idealtrain_like(), tmp_path)
    old.card["training"] = card["training"]
    arguments = training_plan(run, encoder="none", iterations=3, old_model=old)[-1][1]
    assert value(arguments, "--rotation") == "180.0" and "--half" not in arguments  # saved as float32
