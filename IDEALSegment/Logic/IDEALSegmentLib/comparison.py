"""Old model vs retrained model on held-out reviewed cases: scored only where a clinician reviewed.

The rule (also in the README): both models segment the same held-out cases (whole patients that
training never saw); each structure is scored by Dice only on the slices where it was reviewed, so
a structure nobody corrected (whose reference is the old model's own output) cannot decide the
verdict. The new model is better when its mean over the reviewed structures is higher and no
reviewed structure loses more than :data:`MAX_CLASS_DROP`. With fewer than
:data:`MIN_CASES_FOR_VERDICT` held-out cases the verdict is "too few cases to tell".
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vtk

from IDEALTrain.errors import IdealError
from IDEALTrain.labels import CARDIAC_LABELS

from .cancel import CancelToken
from .corrections import LABELED, MANIFEST_NAME, read_manifest
from .volumes import unique_node_name

#: new_is_better refuses a new model that loses more Dice than this on any reviewed structure.
MAX_CLASS_DROP = 0.05
#: Fewest held-out cases for a verdict: with n paired cases a one-sided sign test reaches p < 0.05
#: only when all n agree and 0.5**n < 0.05, i.e. n >= 5 (0.5**4 = 0.0625 can never be significant).
MIN_CASES_FOR_VERDICT = 5
TOO_FEW = "too few cases to tell"
#: Table attributes that let :func:`comparison_from_table` read a comparison back (after a scene reload too).
TABLE_KIND_ATTRIBUTE = "IDEALTrainer.Comparison"
TABLE_CASES_ATTRIBUTE = "IDEALTrainer.HeldOutCases"
MEAN_ROW = "Mean"

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class ModelComparison:
    """Dice of the old and the new model on the same held-out cases: per reviewed structure and their mean."""

    cases: tuple[str, ...]
    old_dice: dict[str, float]
    new_dice: dict[str, float]
    old_mean: float
    new_mean: float
    patients: int = 0  # distinct patients among the cases (0: not known)

    @property
    def enough_cases(self) -> bool:
        """Whether there are enough held-out cases for a verdict (see :data:`MIN_CASES_FOR_VERDICT`)."""
        return len(self.cases) >= MIN_CASES_FOR_VERDICT

    def class_drops(self, tolerance: float = MAX_CLASS_DROP) -> dict[str, float]:
        """Structures on which the new model's Dice is more than ``tolerance`` below the old one's: name -> drop."""
        return {name: old - self.new_dice[name] for name, old in self.old_dice.items() if not self.new_dice[name] >= old - tolerance}

    def new_is_better(self, margin: float = 0.0) -> bool:
        """Whether switching is justified: enough cases, a strictly higher mean (plus ``margin``) and no
        reviewed structure dropping more than :data:`MAX_CLASS_DROP`. Equal models are not better."""
        if margin < 0:
            raise IdealError(f"the margin must be 0 or more, got {margin}")
        values = [self.old_mean, self.new_mean, *self.old_dice.values(), *self.new_dice.values()]
        if not self.enough_cases or not self.old_dice or not all(math.isfinite(v) for v in values):
            return False
        return self.new_mean > self.old_mean + margin and not self.class_drops()

    def summary(self) -> str:
        """Two lines for the status label: the numbers and what they rest on, then the verdict and why."""
        classes = ", ".join(f"{name} {old:.3f} -> {self.new_dice[name]:.3f}" for name, old in self.old_dice.items())
        patients = f" of {self.patients} patient(s)" if self.patients else ""
        text = (
            f"Mean Dice on the reviewed structures and slices of {len(self.cases)} held-out case(s){patients}: "
            f"old {self.old_mean:.3f}, new {self.new_mean:.3f} ({self.new_mean - self.old_mean:+.3f}); {classes or 'none'}.\n"
        )
        if not self.enough_cases:
            return text + (
                f"Verdict: {TOO_FEW} — it rests on {len(self.cases)} case(s); at least {MIN_CASES_FOR_VERDICT} are needed "
                "(review more patients, or hold more out)."
            )
        if self.new_is_better():
            return text + f"Verdict (on {len(self.cases)} cases): the new model is better."
        reasons = []
        if not self.new_mean > self.old_mean:
            reasons.append("its mean Dice is not higher")
        reasons += [f"{name} drops by {drop:.3f} (more than {MAX_CLASS_DROP})" for name, drop in self.class_drops().items()]
        return text + f"Verdict (on {len(self.cases)} cases): the new model is not better: {'; '.join(reasons) or 'a Dice value is undefined'}."


def reviewed_dice(prediction: np.ndarray, reference: np.ndarray, reviewed: Mapping[str, list[int]], slice_axis: int) -> dict[str, float]:
    """Segment ID -> Dice of one case, each structure only on the slices where it was reviewed."""
    values = {label.segment_id: label.value for label in CARDIAC_LABELS}
    pred, ref = np.moveaxis(prediction, slice_axis, 0), np.moveaxis(reference, slice_axis, 0)
    result = {}
    for name, slices in reviewed.items():
        rows = np.asarray(slices, dtype=int)
        p, r = pred[rows] == values[name], ref[rows] == values[name]
        total = int(p.sum()) + int(r.sum())
        result[name] = 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total
    return result


def held_out_regions(held_out_dir: Path, cases: list) -> tuple[dict[str, dict], int]:
    """Per case: reviewed regions from the folder's manifest (every structure on every slice without one); patient count."""
    if not (held_out_dir / MANIFEST_NAME).is_file():
        every = {label.segment_id: None for label in CARDIAC_LABELS}
        return {case.name: every for case in cases}, 0
    entries = {entry["case_id"]: entry for entry in read_manifest(held_out_dir) if entry["kind"] == LABELED}
    regions = {}
    for case in cases:
        entry = entries.get(case.name)
        if entry is None:
            raise IdealError(f"held-out case {case.name} is not in {held_out_dir / MANIFEST_NAME}")
        regions[case.name] = entry.get("reviewed") or {label.segment_id: entry.get("reviewed_slices") for label in CARDIAC_LABELS}
    return regions, len({entries[case.name].get("patient_id") or case.name for case in cases})


def model_score(cases: list, regions: dict, labels_of: Callable[[int, object], np.ndarray]) -> tuple[dict[str, float], float]:
    """One model's Dice per reviewed structure (mean over cases) and their mean; ``labels_of(index, case)`` gives its labels."""
    per_class: dict[str, list[float]] = {}
    for index, case in enumerate(cases):
        labels = labels_of(index, case)
        axis = case.image.slice_axis
        every = list(range(case.image.array.shape[axis]))
        reviewed = {name: every if slices is None else slices for name, slices in regions[case.name].items() if slices != []}
        for name, value in reviewed_dice(labels, case.label.array, reviewed, axis).items():
            per_class.setdefault(name, []).append(value)
    dice = {name: float(np.mean(values)) for name, values in per_class.items()}
    return dice, float(np.mean(list(dice.values()))) if dice else math.nan


def compare_models(
    old_model: object,
    new_model: object,
    held_out_dir: str | Path | None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ModelComparison:
    """Segment every held-out case with both models; average each reviewed structure's Dice (no scene: worker-safe).

    ``held_out_dir`` holds images/ and labels/ and, from a corrections data set, the manifest that
    says what was reviewed. ``progress`` gets 0..1 over both models; ``cancel`` raises Cancelled.
    """
    from IDEALTrain.io.datasets import load_cases

    from .inference import load_predictor, predict_volume

    if held_out_dir is None:
        raise IdealError(f"there are no held-out cases to compare the models on ({TOO_FEW}): review at least 3 patients before training")
    folder = Path(held_out_dir)
    cases = load_cases(f"folder:{folder}", require_labels=True)
    regions, patients = held_out_regions(folder, cases)
    predictors = [load_predictor(model, device) for model in (old_model, new_model)]
    label_maps = [[(label.value, label.segment_id) for label in p.bundle.labels] for p in predictors]
    if label_maps[0] != label_maps[1]:
        raise IdealError(f"the models segment different structures ({label_maps[0]} vs {label_maps[1]}): they cannot be compared")
    steps = 2 * len(cases)
    results = []
    for number, predictor in enumerate(predictors):

        def predicted(index: int, case, number=number, predictor=predictor) -> np.ndarray:
            if cancel is not None:
                cancel.check("the model comparison")
            done = number * len(cases) + index
            step = None if progress is None else (lambda fraction: progress((done + fraction) / steps))
            return predict_volume(case.image, predictor, step, cancel).labels.array

        results.append(model_score(cases, regions, predicted))
    (old_dice, old_mean), (new_dice, new_mean) = results
    return ModelComparison(tuple(case.name for case in cases), old_dice, new_dice, old_mean, new_mean, patients)


# -- the comparison as a table ----------------------------------------------------------------
def comparison_table(scene: object, comparison: ModelComparison, old_name: str, name: str = "IDEALTrainer old vs new Dice") -> object:
    """A NEW table node (unique name): one row per reviewed structure and the mean; columns Class, Old, New, Change.

    The held-out case names and patient count are kept as attributes, so :func:`comparison_from_table`
    reads the whole comparison back, also after the scene was saved and reloaded.
    """
    if scene is None:
        raise IdealError("no scene to add the comparison table to")
    names, old, new, change = vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
    for column, title in ((names, "Class"), (old, f"Old ({old_name})"), (new, "New"), (change, "Change")):
        column.SetName(title)
    rows = [(cls, value, comparison.new_dice[cls]) for cls, value in comparison.old_dice.items()]
    for cls, old_value, new_value in rows + [(MEAN_ROW, comparison.old_mean, comparison.new_mean)]:
        names.InsertNextValue(cls)
        old.InsertNextValue(old_value)
        new.InsertNextValue(new_value)
        change.InsertNextValue(new_value - old_value)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", unique_node_name(scene, name))
    was_modifying = table.StartModify()
    for column in (names, old, new, change):
        table.AddColumn(column)
    table.SetColumnDescription("New", "Dice of the new model on the reviewed structures and slices of the held-out cases")
    table.SetColumnDescription("Change", "new minus old Dice")
    table.SetAttribute(TABLE_KIND_ATTRIBUTE, "1")
    table.SetAttribute(TABLE_CASES_ATTRIBUTE, json.dumps({"cases": list(comparison.cases), "patients": comparison.patients}))
    table.EndModify(was_modifying)
    return table


def comparison_from_table(table: object) -> ModelComparison:
    """The comparison a :func:`comparison_table` node holds (IdealError for any other table)."""
    contents = table.GetTable() if table is not None else None
    if contents is None or table.GetAttribute(TABLE_KIND_ATTRIBUTE) != "1" or contents.GetNumberOfColumns() < 3:
        raise IdealError(f"table {table.GetName() if table is not None else None!r} is not an old vs new model comparison")
    held_out = json.loads(table.GetAttribute(TABLE_CASES_ATTRIBUTE) or "[]")
    cases, patients = (held_out, 0) if isinstance(held_out, list) else (held_out.get("cases", []), int(held_out.get("patients", 0)))
    names, old, new = (contents.GetColumn(index) for index in range(3))
    rows = {names.GetValue(row): (float(old.GetValue(row)), float(new.GetValue(row))) for row in range(contents.GetNumberOfRows())}
    if MEAN_ROW not in rows:
        raise IdealError(f"table {table.GetName()!r} has no {MEAN_ROW} row: it is not an old vs new model comparison")
    means = rows.pop(MEAN_ROW)
    return ModelComparison(tuple(cases), {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}, means[0], means[1], patients)
