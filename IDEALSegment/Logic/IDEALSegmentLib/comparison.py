"""Old model vs retrained model: scored where a clinician reviewed, and where forgetting would show.

The rule (also in docs/retraining.md), one rule counted in patients:

1. **Forgetting** (decides first): both models segment at least one reference that is not from the
   site (by default the shipped CC0 Sunnybrook sample with its expert contours), scored on what the
   reference holds; and the new model's labels are compared with the old model's on every structure
   and slice nobody reviewed (held-out cases, and the structures the reference lacks). A new model
   that loses more than :data:`MAX_REFERENCE_DROP` on a reference, or agrees less than
   :data:`MIN_AGREEMENT` with the old model where nobody reviewed, is **not better**, whatever the
   site cases say.
2. **The site**: held-out patients (training never saw them), each structure's Dice only on the
   slices where it was reviewed. Below :data:`MIN_PATIENTS_FOR_VERDICT` held-out patients the
   verdict is **"too few patients to tell"**. Otherwise the new model is better when its mean over
   the reviewed structures is higher and no reviewed structure loses more than :data:`MAX_CLASS_DROP`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
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
#: A new model losing more mean Dice than this on a non-site reference forgets (ACDC val moved by at most
#: 0.005 with the default plan; the deliberately forgetting plan lost far more, README).
MAX_REFERENCE_DROP = 0.01
#: A new model agreeing less than this (mean Dice with the old model's labels) where nobody reviewed forgets.
MIN_AGREEMENT = 0.9
#: Fewest held-out PATIENTS for a site verdict: with n paired patients a one-sided sign test reaches p < 0.05
#: only when all n agree and 0.5**n < 0.05, i.e. n >= 5 (0.5**4 = 0.0625 can never be significant).
MIN_PATIENTS_FOR_VERDICT = 5
TOO_FEW = "too few patients to tell"
BETTER, NOT_BETTER = "better", "not better"
#: Table attributes that let :func:`comparison_from_table` read a comparison back (after a scene reload too).
TABLE_KIND_ATTRIBUTE = "IDEALTrainer.Comparison"
TABLE_CASES_ATTRIBUTE = "IDEALTrainer.HeldOutCases"
MEAN_ROW = "Mean"
AGREEMENT_ROW = "Agreement with the old model where nobody reviewed"
REFERENCE_PREFIX = "Reference: "

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class ReferenceScore:
    """Mean Dice of both models on a reference that is not from the site (on the structures it holds)."""

    name: str
    cases: int
    old: float
    new: float


@dataclass(frozen=True)
class ModelComparison:
    """Both models on held-out site patients, on non-site references, and their agreement where nobody reviewed."""

    cases: tuple[str, ...]
    old_dice: dict[str, float]
    new_dice: dict[str, float]
    old_mean: float
    new_mean: float
    patients: int = 0  # distinct held-out patients (0: none held out)
    references: tuple[ReferenceScore, ...] = ()
    agreement: float | None = None  # mean Dice of new vs old labels on unreviewed structures and slices
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. a reference that could not be scored

    @property
    def enough_patients(self) -> bool:
        """Whether enough held-out patients back a site verdict (see :data:`MIN_PATIENTS_FOR_VERDICT`)."""
        return self.patients >= MIN_PATIENTS_FOR_VERDICT

    def class_drops(self, tolerance: float = MAX_CLASS_DROP) -> dict[str, float]:
        """Structures on which the new model's Dice is more than ``tolerance`` below the old one's: name -> drop."""
        return {name: old - self.new_dice[name] for name, old in self.old_dice.items() if not self.new_dice[name] >= old - tolerance}

    def forgetting(self) -> list[str]:
        """Why the new model forgets (empty when it does not): reference losses and disagreement where nobody reviewed."""
        reasons = [
            f"it loses {ref.old - ref.new:.3f} Dice on {ref.name} (more than {MAX_REFERENCE_DROP})"
            for ref in self.references if not ref.new >= ref.old - MAX_REFERENCE_DROP
        ]
        if self.agreement is not None and not self.agreement >= MIN_AGREEMENT:
            reasons.append(f"it agrees only {self.agreement:.3f} with the old model where nobody reviewed (at least {MIN_AGREEMENT} needed)")
        return reasons

    def verdict(self, margin: float = 0.0) -> str:
        """:data:`BETTER`, :data:`NOT_BETTER` or :data:`TOO_FEW` (see the module's rule); equal models are not better."""
        if margin < 0:
            raise IdealError(f"the margin must be 0 or more, got {margin}")
        if self.forgetting():
            return NOT_BETTER
        if not self.enough_patients:
            return TOO_FEW
        values = [self.old_mean, self.new_mean, *self.old_dice.values(), *self.new_dice.values()]
        if not self.old_dice or not all(math.isfinite(v) for v in values):
            return NOT_BETTER
        return BETTER if self.new_mean > self.old_mean + margin and not self.class_drops() else NOT_BETTER

    def new_is_better(self, margin: float = 0.0) -> bool:
        """Whether switching is justified: no forgetting, enough held-out patients, a higher mean and no structure losing."""
        return self.verdict(margin) == BETTER

    def summary(self) -> str:
        """The numbers and what they rest on, then the verdict and why: the one text of status, job message and Use this model."""
        lines = []
        if self.cases:
            classes = ", ".join(f"{name} {old:.3f} -> {self.new_dice[name]:.3f}" for name, old in self.old_dice.items())
            lines.append(
                f"Site: mean Dice on the reviewed structures and slices of {self.patients} held-out patient(s) "
                f"({len(self.cases)} case(s)): old {self.old_mean:.3f}, new {self.new_mean:.3f} "
                f"({self.new_mean - self.old_mean:+.3f}); {classes or 'none'}."
            )
        else:
            lines.append("Site: no held-out patients (fewer than 3 reviewed patients: all of them trained).")
        lines += [f"Reference {ref.name} ({ref.cases} case(s)): old {ref.old:.3f}, new {ref.new:.3f} ({ref.new - ref.old:+.3f})."
                  for ref in self.references]
        if self.agreement is not None:
            lines.append(f"Agreement with the old model where nobody reviewed: {self.agreement:.3f}.")
        lines += list(self.notes)
        verdict = self.verdict()
        if verdict == TOO_FEW:
            lines.append(
                f"Verdict: {TOO_FEW} — {self.patients} held-out patient(s), at least {MIN_PATIENTS_FOR_VERDICT} are needed "
                "(no forgetting seen). Review more patients (every 5th one is held out), or keep the current model."
            )
        elif verdict == BETTER:
            lines.append(f"Verdict (on {self.patients} held-out patients): the new model is better.")
        else:
            reasons = self.forgetting()
            if not reasons:
                if not self.new_mean > self.old_mean:
                    reasons.append("its mean Dice on the site is not higher")
                reasons += [f"{name} drops by {drop:.3f} (more than {MAX_CLASS_DROP})" for name, drop in self.class_drops().items()]
            lines.append(f"Verdict: the new model is not better: {'; '.join(reasons) or 'a Dice value is undefined'}.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelComparison:
        refs = tuple(ReferenceScore(**ref) for ref in data.get("references", ()))
        return cls(tuple(data["cases"]), dict(data["old_dice"]), dict(data["new_dice"]), float(data["old_mean"]), float(data["new_mean"]),
                   int(data.get("patients", 0)), refs, data.get("agreement"), tuple(data.get("notes", ())))


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
    """Per case: reviewed regions from the folder's manifest (every structure on every slice without one); patient count
    (without a manifest every case is its own patient)."""
    if not (held_out_dir / MANIFEST_NAME).is_file():
        every = {label.segment_id: None for label in CARDIAC_LABELS}
        return {case.name: every for case in cases}, len(cases)
    entries = {entry["case_id"]: entry for entry in read_manifest(held_out_dir) if entry["kind"] == LABELED}
    regions = {}
    for case in cases:
        entry = entries.get(case.name)
        if entry is None:
            raise IdealError(f"held-out case {case.name} is not in {held_out_dir / MANIFEST_NAME}")
        regions[case.name] = entry.get("reviewed") or {label.segment_id: entry.get("reviewed_slices") for label in CARDIAC_LABELS}
    return regions, len({entries[case.name].get("patient_id") or case.name for case in cases})


def _slices_where(label: np.ndarray, value: int, axis: int) -> list[int]:
    other = tuple(a for a in range(label.ndim) if a != axis)
    return [int(k) for k in np.flatnonzero((label == value).any(axis=other))]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def score_models(
    held_out: list, regions: Mapping[str, Mapping], patients: int, references: Mapping[str, list],
    labels_of: Callable[[str, str, int, object], np.ndarray], notes: tuple[str, ...] = (),
) -> ModelComparison:
    """The whole comparison from both models' labels: ``labels_of(model, set, index, case)`` with model "old" or "new",
    set "held_out" or a reference's name. Site Dice where reviewed; reference Dice on the structures and slices the
    reference holds; agreement (Dice of new vs old labels) on everything nobody reviewed."""
    values = {label.segment_id: label.value for label in CARDIAC_LABELS}
    site = {"old": {}, "new": {}}
    agreement: list[float] = []
    for index, case in enumerate(held_out):
        axis, count = case.image.slice_axis, case.image.array.shape[case.image.slice_axis]
        old, new = labels_of("old", "held_out", index, case), labels_of("new", "held_out", index, case)
        reviewed = {name: list(range(count)) if ks is None else ks for name, ks in regions[case.name].items() if ks != []}
        for tag, labels in (("old", old), ("new", new)):
            for name, value in reviewed_dice(labels, case.label.array, reviewed, axis).items():
                site[tag].setdefault(name, []).append(value)
        unreviewed = {name: [k for k in range(count) if k not in set(reviewed.get(name, []))] for name in values}
        agreement += list(reviewed_dice(new, old, {n: ks for n, ks in unreviewed.items() if ks}, axis).values())
    scores = []
    for name, cases in references.items():
        per_case = {"old": [], "new": []}
        for index, case in enumerate(cases):
            axis = case.image.slice_axis
            old, new = labels_of("old", name, index, case), labels_of("new", name, index, case)
            held = {n: _slices_where(case.label.array, v, axis) for n, v in values.items()}
            for tag, labels in (("old", old), ("new", new)):
                per_case[tag].append(_mean(list(reviewed_dice(labels, case.label.array, {n: ks for n, ks in held.items() if ks}, axis).values())))
            every = list(range(case.image.array.shape[axis]))
            agreement += list(reviewed_dice(new, old, {n: every for n, ks in held.items() if not ks}, axis).values())
        scores.append(ReferenceScore(name, len(cases), _mean(per_case["old"]), _mean(per_case["new"])))
    dice = {tag: {name: float(np.mean(v)) for name, v in site[tag].items()} for tag in site}
    return ModelComparison(
        tuple(case.name for case in held_out), dice["old"], dice["new"], _mean(list(dice["old"].values())),
        _mean(list(dice["new"].values())), patients if held_out else 0, tuple(scores), _mean(agreement) if agreement else None, notes,
    )


def default_references() -> dict[str, str]:
    """The non-site references every comparison scores: the shipped CC0 sample (Sunnybrook) with its expert contours."""
    from IDEALTrain.io.sample_data import SAMPLE_FOLDER, load_sample, resources_dir

    sample = load_sample(resources_dir() / SAMPLE_FOLDER)
    return {f"the shipped sample {sample.patient}": f"sample:{sample.root}"}


def load_references(references: Mapping[str, str] | None) -> tuple[dict[str, list], tuple[str, ...]]:
    """Reference name -> its cases (with labels); notes for references that cannot be read (the comparison goes on)."""
    from IDEALTrain.io.datasets import load_cases

    loaded, notes = {}, []
    try:
        specs = default_references() if references is None else dict(references)
    except IdealError as error:
        return {}, (f"No non-site reference: {error}",)
    for name, spec in specs.items():
        try:
            loaded[name] = load_cases(spec, require_labels=True)
        except IdealError as error:
            notes.append(f"Reference {name} was not scored: {error}")
    return loaded, tuple(notes)


def compare_models(
    old_model: object,
    new_model: object,
    held_out_dir: str | Path | None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    references: Mapping[str, str] | None = None,
) -> ModelComparison:
    """Segment the held-out cases (if any) and the references with both models and score them (no scene: worker-safe).

    ``held_out_dir`` holds images/ and labels/ and, from a corrections data set, the manifest that
    says what was reviewed. ``references``: name -> data spec (default :func:`default_references`).
    ``progress`` gets 0..1 over both models; ``cancel`` raises Cancelled.
    """
    from IDEALTrain.io.datasets import load_cases

    from .inference import load_predictor, predict_volume

    held_out, regions, patients = [], {}, 0
    if held_out_dir is not None:
        folder = Path(held_out_dir)
        held_out = load_cases(f"folder:{folder}", require_labels=True)
        regions, patients = held_out_regions(folder, held_out)
    refs, notes = load_references(references)
    predictors = {tag: load_predictor(model, device) for tag, model in (("old", old_model), ("new", new_model))}
    label_maps = [[(label.value, label.segment_id) for label in p.bundle.labels] for p in predictors.values()]
    if label_maps[0] != label_maps[1]:
        raise IdealError(f"the models segment different structures ({label_maps[0]} vs {label_maps[1]}): they cannot be compared")
    sets = [("held_out", held_out), *refs.items()]
    steps, done = 2 * sum(len(cases) for _, cases in sets), [0]
    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def labels_of(tag: str, set_name: str, index: int, case) -> np.ndarray:
        key = (tag, set_name, index)
        if key not in cache:
            if cancel is not None:
                cancel.check("the model comparison")
            step = None if progress is None else (lambda fraction, at=done[0]: progress((at + fraction) / steps))
            cache[key] = predict_volume(case.image, predictors[tag], step, cancel).labels.array
            done[0] += 1
        return cache[key]

    return score_models(held_out, regions, patients, refs, labels_of, notes)


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
    rows += [(MEAN_ROW, comparison.old_mean, comparison.new_mean)]
    rows += [(f"{REFERENCE_PREFIX}{ref.name}", ref.old, ref.new) for ref in comparison.references]
    if comparison.agreement is not None:
        rows.append((AGREEMENT_ROW, 1.0, comparison.agreement))
    for cls, old_value, new_value in rows:
        names.InsertNextValue(cls)
        old.InsertNextValue(old_value)
        new.InsertNextValue(new_value)
        change.InsertNextValue(new_value - old_value)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", unique_node_name(scene, name))
    was_modifying = table.StartModify()
    for column in (names, old, new, change):
        table.AddColumn(column)
    table.SetColumnDescription("New", "Dice of the new model: site rows on the reviewed structures and slices of the held-out patients; reference rows on a non-site reference; agreement with the old model where nobody reviewed")
    table.SetColumnDescription("Change", "new minus old Dice")
    table.SetAttribute(TABLE_KIND_ATTRIBUTE, "1")
    table.SetAttribute(TABLE_CASES_ATTRIBUTE, json.dumps({"cases": list(comparison.cases), "patients": comparison.patients,
                                                          "comparison": comparison.to_json()}))
    table.EndModify(was_modifying)
    return table


def comparison_from_table(table: object) -> ModelComparison:
    """The comparison a :func:`comparison_table` node holds (IdealError for any other table)."""
    contents = table.GetTable() if table is not None else None
    if contents is None or table.GetAttribute(TABLE_KIND_ATTRIBUTE) != "1" or contents.GetNumberOfColumns() < 3:
        raise IdealError(f"table {table.GetName() if table is not None else None!r} is not an old vs new model comparison")
    held_out = json.loads(table.GetAttribute(TABLE_CASES_ATTRIBUTE) or "[]")
    if isinstance(held_out, dict) and isinstance(held_out.get("comparison"), dict):
        try:
            return ModelComparison.from_json(held_out["comparison"])
        except (KeyError, TypeError, ValueError):
            raise IdealError(f"table {table.GetName()!r} holds an unreadable comparison") from None
    cases, patients = (held_out, 0) if isinstance(held_out, list) else (held_out.get("cases", []), int(held_out.get("patients", 0)))
    names, old, new = (contents.GetColumn(index) for index in range(3))
    rows = {names.GetValue(row): (float(old.GetValue(row)), float(new.GetValue(row))) for row in range(contents.GetNumberOfRows())}
    if MEAN_ROW not in rows:
        raise IdealError(f"table {table.GetName()!r} has no {MEAN_ROW} row: it is not an old vs new model comparison")
    means = rows.pop(MEAN_ROW)
    return ModelComparison(tuple(cases), {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}, means[0], means[1], patients)
