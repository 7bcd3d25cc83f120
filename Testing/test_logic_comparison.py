"""Old vs new model (IDEALSegmentLib.comparison): held-out patients scored only where reviewed, a non-site
reference and agreement where nobody reviewed (forgetting decides first), "too few patients to tell" below
the threshold, and the table.

Corrections data sets are exported from real MRML nodes (slicer-core); models are tiny bundles.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import import_slicer_core, varied_bundle

slicer = import_slicer_core()

from IDEALSegmentLib.cancel import Cancelled, CancelToken  # noqa: E402
from IDEALSegmentLib.comparison import (  # noqa: E402
    MIN_AGREEMENT,
    MIN_PATIENTS_FOR_VERDICT,
    ModelComparison,
    ReferenceScore,
    compare_models,
    comparison_from_table,
    comparison_table,
    reviewed_dice,
)
from IDEALSegmentLib.corrections import export_correction  # noqa: E402
from IDEALSegmentLib.registry import ModelEntry  # noqa: E402
from IDEALSegmentLib.retraining import prepare_run  # noqa: E402
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.inference.predictor import Predictor  # noqa: E402
from IDEALTrain.io.datasets import load_cases  # noqa: E402
from IDEALTrain.io.phantom import make_phantom  # noqa: E402
from IDEALTrain.model.bundle import read_card, save_bundle  # noqa: E402

SIX = ("a", "b", "c", "d", "e", "f")


# -- old vs new -----------------------------------------------------------------------------------
def export_cases(folder: Path, patients: dict[str, list[str]], reviewed=None) -> Path:
    """Phantom cases exported from MRML nodes, grouped into patients; ``reviewed`` as export_correction takes it."""
    scene = slicer.vtkMRMLScene()
    seed = 0
    for patient, case_ids in patients.items():
        for case_id in case_ids:
            image, label = make_phantom(seed, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
            seed += 1
            volume = volume_from_image(image, scene, case_id)
            export_correction(folder, volume, segmentation_from_labels(label, volume), case_id=case_id, reviewer="test",
                              reviewed_structures=reviewed, patient_id=patient)
    return folder


@pytest.fixture(scope="module")
def comparison_setup(tmp_path_factory):
    """Six held-out cases of three patients, the LV and myocardium reviewed (RV not), and two different tiny models."""
    folder = tmp_path_factory.mktemp("compare")
    patients = {f"p{n}": [f"p{n}_ed", f"p{n}_es"] for n in range(5)}
    data = export_cases(folder / "corrections", patients, reviewed=["LV", "LV_Myocardium"])
    run = prepare_run(data, folder / "run", hold_out_every=2)
    first = save_bundle(varied_bundle(0), folder / "first")
    second = save_bundle(varied_bundle(5), folder / "second")
    return run, first, second


def test_compare_models_scores_only_the_reviewed_structures_and_slices(comparison_setup):
    run, first, second = comparison_setup
    assert run.held_out_cases == ("p1_ed", "p1_es", "p3_ed", "p3_es")  # whole patients: 2nd and 4th of five
    fractions = []
    comparison = compare_models(first, second, run.held_out_dir, device="cpu", progress=fractions.append, references={})
    assert comparison.cases == run.held_out_cases and comparison.patients == 2
    assert list(comparison.old_dice) == ["LV", "LV_Myocardium"] == list(comparison.new_dice)  # RV was never reviewed
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and fractions[0] < 0.5
    # Independently: per class, Dice on the slices where the reference has that class, averaged over the cases.
    cases = load_cases(f"folder:{run.held_out_dir}", require_labels=True)
    for bundle, scores, mean in ((first, comparison.old_dice, comparison.old_mean), (second, comparison.new_dice, comparison.new_mean)):
        predictor = Predictor(bundle, device="cpu")
        predictions = [predictor.predict(case.image).labels.array for case in cases]
        for value_, name in ((2, "LV_Myocardium"), (3, "LV")):
            per_case = []
            for p, case in zip(predictions, cases):
                ref = case.label.array == value_
                rows = ref.any(axis=(1, 2))
                pred, truth = (p == value_)[rows], ref[rows]
                per_case.append(2 * np.sum(pred & truth) / (np.sum(pred) + np.sum(truth)))
            assert scores[name] == pytest.approx(np.mean(per_case))
        assert mean == pytest.approx(np.mean(list(scores.values())))
    assert comparison.old_dice != comparison.new_dice
    assert not comparison.enough_patients and not comparison.new_is_better()  # 2 patients: below the threshold
    assert comparison.agreement is not None and comparison.agreement < 1  # the RV nobody reviewed: new vs old labels
    text = comparison.summary()
    assert "2 held-out patient(s) (4 case(s))" in text
    # Two unrelated models disagree on the RV nobody reviewed: that decides first, before "too few patients to tell".
    assert comparison.verdict() == "not better" and "with the old model where nobody reviewed" in text


def test_an_unreviewed_structure_never_decides(tmp_path):
    """The RV reference is the old model's own output: it is left out, however the models differ on it."""
    prediction = np.zeros((2, 4, 4), np.uint8)
    reference = prediction.copy()
    reference[:, 1:3, 1:3] = 1  # RV only in the reference
    prediction[0, 0, 0] = reference[0, 0, 0] = 3
    assert reviewed_dice(prediction, reference, {"LV": [0]}, 0) == {"LV": 1.0}
    assert reviewed_dice(prediction, reference, {"RV": [0, 1]}, 0) == {"RV": 0.0}


def test_a_model_compared_with_itself_is_not_better(comparison_setup, tmp_path):
    run, first, _ = comparison_setup
    old = ModelEntry("tiny-test", "0.0.1", first, "user", read_card(first))
    copy = shutil.copytree(first, tmp_path / "copy")
    comparison = compare_models(old, copy, run.held_out_dir, device="cpu")  # with the default reference: the shipped sample
    assert comparison.old_dice == comparison.new_dice and comparison.old_mean == comparison.new_mean
    [reference] = comparison.references
    assert reference.name == "the shipped sample SCD0000101" and reference.cases == 2 and reference.old == reference.new
    assert comparison.agreement == 1.0 and not comparison.new_is_better()


def test_compare_models_cancels_and_needs_held_out_cases(comparison_setup):
    run, first, second = comparison_setup
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        compare_models(first, second, run.held_out_dir, device="cpu", cancel=token)
    # No held-out patients (fewer than 3 reviewed): the references and agreement are still scored.
    alone = compare_models(first, second, None, device="cpu", references={"the phantom": f"folder:{run.held_out_dir}"})
    assert alone.cases == () and alone.patients == 0 and alone.references[0].cases == 4
    assert alone.verdict() in ("not better", "too few patients to tell") and "Site: no held-out patients" in alone.summary()


def comparison(old: dict, new: dict, patients: int = 6, **more) -> ModelComparison:
    cases = tuple(f"{p}_{phase}" for p in SIX[:patients] for phase in ("ed", "es"))
    return ModelComparison(cases, old, new, float(np.mean(list(old.values()))), float(np.mean(list(new.values()))), patients, **more)


OLD = {"RV": 0.70, "LV_Myocardium": 0.80, "LV": 0.90}


@pytest.mark.parametrize(
    "new, margin, better",
    [
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.0, True),  # higher mean, no class worse
        ({"RV": 0.80, "LV_Myocardium": 0.76, "LV": 0.90}, 0.0, True),  # a small drop (0.04) is tolerated
        (dict(OLD), 0.0, False),  # equal is not better
        ({"RV": 0.69, "LV_Myocardium": 0.80, "LV": 0.90}, 0.0, False),  # lower mean
        ({"RV": 0.95, "LV_Myocardium": 0.70, "LV": 0.90}, 0.0, False),  # higher mean but myocardium drops 0.10
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.02, False),  # +0.0167 does not clear a 0.02 margin
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.01, True),
        ({"RV": math.nan, "LV_Myocardium": 0.90, "LV": 0.95}, 0.0, False),  # undefined is never better
    ],
)
def test_new_is_better_rule(new, margin, better):
    assert comparison(OLD, new).new_is_better(margin) is better


def test_too_few_patients_to_tell():
    """Below MIN_PATIENTS_FOR_VERDICT held-out patients even a large gain gets no verdict; the text says what to do."""
    gain = {"RV": 0.90, "LV_Myocardium": 0.95, "LV": 0.99}
    assert MIN_PATIENTS_FOR_VERDICT == 5 and 0.5**MIN_PATIENTS_FOR_VERDICT < 0.05 <= 0.5 ** (MIN_PATIENTS_FOR_VERDICT - 1)
    few = comparison(OLD, gain, 4)  # 8 cases, but 4 patients
    assert not few.enough_patients and not few.new_is_better() and few.verdict() == "too few patients to tell"
    assert "Verdict: too few patients to tell — 4 held-out patient(s), at least 5 are needed" in few.summary()
    assert "Review more patients" in few.summary()
    enough = comparison(OLD, gain, 5)
    assert enough.new_is_better() and enough.summary().endswith("Verdict (on 5 held-out patients): the new model is better.")


@pytest.mark.parametrize("patients", [0, 2, 6])
def test_forgetting_is_never_better_whatever_the_site_says(patients):
    """A model that loses on the non-site reference, or changes what nobody reviewed, is not better (with 0 held-out
    patients too), even when the site gain is large."""
    gain = {"RV": 0.90, "LV_Myocardium": 0.95, "LV": 0.99}
    kept = (ReferenceScore("ACDC", 20, 0.889, 0.886),)
    assert comparison(OLD, gain, 6, references=kept, agreement=0.97).new_is_better()
    lost = comparison(OLD, gain, patients, references=(ReferenceScore("ACDC", 20, 0.889, 0.876),), agreement=0.97)
    assert lost.verdict() == "not better" and "loses 0.013 Dice on ACDC (more than 0.01)" in lost.summary()
    drifted = comparison(OLD, gain, patients, references=kept, agreement=MIN_AGREEMENT - 0.01)
    assert drifted.verdict() == "not better" and "agrees only 0.890 with the old model where nobody reviewed" in drifted.summary()


def test_agreement_is_scored_where_nobody_reviewed():
    """score_models: site Dice on the reviewed slices, agreement (new vs old labels) on every unreviewed structure and slice."""
    from types import SimpleNamespace

    from IDEALSegmentLib.comparison import score_models

    from IDEALTrain.io.image import Image

    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, 1:3, 1:3] = 3
    image = Image(np.zeros((2, 4, 4), np.float32), (1.0, 1.0, 1.0))
    case = SimpleNamespace(name="c", image=image, label=image.with_array(truth))
    old = truth.copy()
    old[:, 0, :] = 1  # the old model's RV on both slices
    new = old.copy()
    new[1, 0, :] = 0  # the new model dropped the RV on slice 1, which nobody reviewed
    labels = {"old": old, "new": new}
    result = score_models([case], {"c": {"LV": [0, 1]}}, 1, {}, lambda tag, _set, _i, _case: labels[tag])
    assert result.old_dice == result.new_dice == {"LV": 1.0}
    # RV: slice 0 agrees (1.0), slice 1 lost -> Dice over both slices 2*4/(8+4) = 0.667; myocardium absent in both: 1.0.
    assert result.agreement == pytest.approx(np.mean([2 * 4 / 12, 1.0]))


def test_summary_says_why_and_negative_margins_are_refused():
    worse = comparison(OLD, {"RV": 0.95, "LV_Myocardium": 0.70, "LV": 0.90})
    text = worse.summary()
    assert "old 0.800, new 0.850 (+0.050)" in text and "LV_Myocardium 0.800 -> 0.700" in text
    assert "6 held-out patient(s) (12 case(s))" in text
    assert "not better: LV_Myocardium drops by 0.100 (more than 0.05)" in text
    with pytest.raises(IdealError, match="margin"):
        worse.new_is_better(-0.1)


# -- the table ------------------------------------------------------------------------------------
def test_comparison_table_holds_the_dice_and_reads_back():
    scene = slicer.vtkMRMLScene()
    result = comparison(OLD, {"RV": 0.75, "LV_Myocardium": 0.78, "LV": 0.92})
    table = comparison_table(scene, result, "heart 1.2.0")
    contents = table.GetTable()
    assert [contents.GetColumn(i).GetName() for i in range(contents.GetNumberOfColumns())] == ["Class", "Old (heart 1.2.0)", "New", "Change"]
    rows = [[contents.GetValue(r, c).ToString() if c == 0 else contents.GetValue(r, c).ToDouble() for c in range(4)] for r in range(contents.GetNumberOfRows())]
    assert [row[0] for row in rows] == ["RV", "LV_Myocardium", "LV", "Mean"]
    assert rows[1][1:] == pytest.approx([0.80, 0.78, -0.02])
    assert rows[3][1:] == pytest.approx([0.80, 0.8166667, 0.0166667], abs=1e-6)
    assert comparison_from_table(table) == result
    again = comparison_table(scene, result, "heart 1.2.0")
    assert again.GetName() != table.GetName() and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 2


def test_comparison_from_table_refuses_other_tables():
    scene = slicer.vtkMRMLScene()
    other = scene.AddNewNodeByClass("vtkMRMLTableNode", "measurements")
    with pytest.raises(IdealError, match="not an old vs new model comparison"):
        comparison_from_table(other)
    with pytest.raises(IdealError, match="no scene"):
        comparison_table(None, comparison(OLD, OLD), "old")
