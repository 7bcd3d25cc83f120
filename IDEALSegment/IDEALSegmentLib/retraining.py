"""Retraining a model from the reviewed cases, and deciding whether the new model may replace the old.

A run is prepared from a corrections data set (:mod:`.corrections`) by copying its reviewed cases
into a training and a held-out folder (:func:`prepare_run`); :func:`training_plan` lists the
``idealtrain`` runs that train the new model with the old model's architecture and preprocessing;
:func:`compare_models` scores old and new on the held-out cases, which training never saw, and
:meth:`ModelComparison.new_is_better` says whether switching is justified. Nothing here touches Qt;
torch is imported only inside the functions that read bundles or run networks, so the GUI can import
this module at Slicer start-up.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import vtk

from IDEALTrain.io.atomic import atomic_path
from IDEALTrain.errors import IdealError

from .cancel import CancelToken
from .corrections import LABELED, MANIFEST_NAME, read_manifest
from .jobs import finetune_arguments
from .registry import ModelEntry, next_patch_version
from .volumes import unique_node_name

#: With at least MIN_CASES_TO_HOLD_OUT reviewed cases, every HOLD_OUT_EVERY-th one is held out.
HOLD_OUT_EVERY = 5
MIN_CASES_TO_HOLD_OUT = 3
#: new_is_better refuses a new model that loses more Dice than this on any single class.
MAX_CLASS_DROP = 0.05
#: How the network starts: encoder pretrained in this run, encoder reused from a bundle, at random,
#: or the whole old model continued on the new cases ("model": the quickest, keeps what it learned).
ENCODER_STARTS = ("pretrain", "reuse", "none", "model")
PRETRAIN_PHASE, FINETUNE_PHASE = "Pretraining the encoder", "Finetuning"
RUN_RECORD = "run.json"
#: Table attributes that let :func:`comparison_from_table` read a comparison back (after a scene reload too).
TABLE_KIND_ATTRIBUTE = "IDEALTrainer.Comparison"
TABLE_CASES_ATTRIBUTE = "IDEALTrainer.HeldOutCases"
MEAN_ROW = "Mean"

ProgressCallback = Callable[[float], None]


# -- preparing a run --------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainingRun:
    """The folders of one retraining run (all under ``run_dir`` except the unlabelled pool)."""

    run_dir: Path
    corrections_dir: Path
    train_cases: tuple[str, ...]
    held_out_cases: tuple[str, ...]
    unlabeled_dir: Path | None  # the data set's own pool, read (never written) by training

    @property
    def train_dir(self) -> Path:
        """``folder:`` data set of the training cases (copies)."""
        return self.run_dir / "train"

    @property
    def held_out_dir(self) -> Path | None:
        """``folder:`` data set of the held-out cases (copies), None when too few cases were reviewed."""
        return self.run_dir / "held_out" if self.held_out_cases else None

    @property
    def encoder(self) -> Path:
        """Where the pretraining step writes the encoder bundle."""
        return self.run_dir / "encoder"

    @property
    def bundle(self) -> Path:
        """Where finetuning writes the new model bundle."""
        return self.run_dir / "model"

    @property
    def log(self) -> Path:
        """The training log of the run."""
        return self.run_dir / "training.log"


def split_cases(case_ids: Sequence[str], hold_out_every: int = HOLD_OUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held out) case ids, in the given (manifest) order.

    Rule: with fewer than 3 cases nothing is held out (all train). Otherwise the 5th, 10th, 15th ...
    case (every ``hold_out_every``-th) is held out, and when there is no such case (3 or 4 cases)
    the last one is. So at least one case is held out and at least two train.
    """
    if hold_out_every < 2:
        raise IdealError(f"hold_out_every must be at least 2 (1 would hold out every case), got {hold_out_every}")
    ids = list(case_ids)
    held_out: list[str] = []
    if len(ids) >= MIN_CASES_TO_HOLD_OUT:
        held_out = ids[hold_out_every - 1 :: hold_out_every] or ids[-1:]
    return [case for case in ids if case not in held_out], held_out


def _clear(run_dir: Path, existed: bool) -> None:
    """Put a run folder back as it was before :func:`prepare_run`: absent, or empty."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def prepare_run(corrections_dir: str | Path, run_dir: str | Path, hold_out_every: int = HOLD_OUT_EVERY) -> RetrainingRun:
    """Copy the reviewed cases into ``run_dir/train`` and ``run_dir/held_out`` (see :func:`split_cases`).

    The corrections data set is only read. ``run_dir`` must be new or empty; if copying fails it is
    left as it was. The split is recorded in ``run_dir/run.json``.
    """
    corrections, run_dir = Path(corrections_dir), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise IdealError(f"{run_dir} is not an empty folder: choose a new folder for the training run (nothing was changed)")
    if not (corrections / MANIFEST_NAME).is_file():
        raise IdealError(f"{corrections} is not a corrections data set (no {MANIFEST_NAME}): mark cases as reviewed in IDEALSegment first")
    cases = {case["case_id"]: case for case in read_manifest(corrections) if case["kind"] == LABELED}
    if not cases:
        raise IdealError(f"no reviewed cases in {corrections}: mark cases as reviewed in IDEALSegment first")
    train, held_out = split_cases(list(cases), hold_out_every)
    pool = corrections / "unlabeled"
    has_pool = (pool / "images").is_dir() and any(p.is_file() for p in (pool / "images").iterdir())
    run = RetrainingRun(run_dir, corrections, tuple(train), tuple(held_out), pool if has_pool else None)
    existed = run_dir.exists()
    try:
        for folder, ids in ((run.train_dir, train), (run.run_dir / "held_out", held_out)):
            for case_id in ids:
                for kind in ("image", "label"):
                    name = cases[case_id]["files"][kind]
                    target = folder / f"{kind}s" / Path(name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(corrections / name, target)
        record = {
            "corrections_dir": str(corrections), "hold_out_every": hold_out_every, "train_cases": train,
            "held_out_cases": held_out, "unlabeled_dir": str(run.unlabeled_dir) if run.unlabeled_dir else None,
        }
        with atomic_path(run_dir / RUN_RECORD) as temp:
            temp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    except BaseException:
        _clear(run_dir, existed)
        raise
    return run


# -- planning the training runs ---------------------------------------------------------------
def _plain(value: object) -> object:
    """JSON round trip: tuples become lists, so card values compare with config values."""
    return json.loads(json.dumps(value))


def architecture_flags(card: dict, what: str = "the model") -> tuple[list[str], list[str]]:
    """(network flags, preprocessing flags) with which ``idealtrain`` rebuilds the card's architecture and preprocessing.

    Raises IdealError when the card holds settings those flags cannot reproduce (e.g. a non-square
    size or custom FPN width): then a retrained model would not be a like-for-like replacement.
    """
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.model.preprocessing import Preprocessing

    architecture, preprocessing = card.get("architecture"), card.get("preprocessing")
    try:
        base, depth = int(architecture["base_channels"]), int(architecture["depth"])
        decoders = tuple(str(kind) for kind in architecture["decoders"])
        inplane, size, spacing = str(preprocessing["inplane"]), int(preprocessing["size"][0]), float(preprocessing["spacing"][0])
        network = _plain(NetworkConfig(base_channels=base, depth=depth, decoders=decoders).to_json())
        plan = _plain(Preprocessing(inplane=inplane, size=(size, size), spacing=(spacing, spacing)).to_json())
    except (KeyError, TypeError, ValueError, IndexError):
        raise IdealError(f"{what}: its card has no readable architecture and preprocessing sections; it cannot be retrained") from None
    differences = []
    for section, rebuilt in ((architecture, network), (preprocessing, plan)):
        for key in sorted(set(section) | set(rebuilt)):
            if _plain(section.get(key)) != rebuilt.get(key):
                differences.append(f"{key} {section.get(key)!r} (idealtrain would use {rebuilt.get(key)!r})")
    if differences:
        raise IdealError(
            f"{what} cannot be retrained like-for-like: idealtrain's options cannot reproduce its "
            f"{'; '.join(differences)}. Retrain it with the tools that made it, or choose a model trained with idealtrain"
        )
    network_flags = ["--base-channels", str(base), "--depth", str(depth)]
    return network_flags + ["--decoders", ",".join(decoders)], ["--inplane", inplane, "--size", str(size), "--spacing", str(spacing)]


def check_encoder(encoder_path: str | Path, old_model: ModelEntry | None) -> None:
    """Refuse a bundle that is no pretrained encoder, or whose encoder differs from the old model's."""
    from IDEALTrain.model.bundle import read_card

    path = Path(encoder_path)
    card = read_card(path)
    if card.get("kind") != "pretrained-encoder":
        raise IdealError(f"{path} is a {card.get('kind', 'segmentation')} bundle, not a pretrained encoder: choose the output of idealtrain pretrain")
    if old_model is None:
        return
    fields = ("in_channels", "base_channels", "depth")
    theirs, mine = card.get("architecture") or {}, old_model.card.get("architecture") or {}
    if any(theirs.get(f) != mine.get(f) for f in fields):
        describe = lambda arch: ", ".join(f"{f} {arch.get(f)}" for f in fields)  # noqa: E731
        raise IdealError(
            f"the pretrained encoder {path} has {describe(theirs)} but {old_model.display_name} has {describe(mine)}: "
            "the new model must have the old model's architecture to replace it; pretrain a new encoder instead, "
            "or choose one pretrained with the same width and depth"
        )


def training_plan(
    run: RetrainingRun,
    *,
    encoder: str = "pretrain",
    encoder_path: str | Path | None = None,
    pretrain_iterations: int = 500,
    iterations: int = 1000,
    label_budget: int = 0,
    device: str = "auto",
    old_model: ModelEntry | None = None,
    extra: Sequence[str] = (),
) -> list[tuple[str, list[str]]]:
    """[(phase, idealtrain arguments)]: optional encoder pretraining, then finetuning to ``run.bundle``.

    With ``old_model`` both steps use its architecture, preprocessing and postprocessing (read from its
    card; ``encoder="model"`` starts from its weights too) and the new bundle gets its id and the next
    patch version, so the two compare like-for-like and the new one drops in. The held-out cases are
    not trained on and do not choose checkpoints: finetuning reports its Dice on them as live
    validation (``--keep last``) and keeps its last weights.
    ``label_budget`` > 0 labels only the first N training cases; ``extra`` goes to finetuning.
    Every check runs before anything starts.
    """
    if encoder not in ENCODER_STARTS:
        raise IdealError(f"unknown encoder start {encoder!r}; choose one of {', '.join(ENCODER_STARTS)}")
    if iterations < 1 or (encoder == "pretrain" and pretrain_iterations < 1):
        raise IdealError(f"training needs at least 1 iteration per step, got {pretrain_iterations} and {iterations}")
    if label_budget < 0:
        raise IdealError(f"the label budget must be 0 (every case) or more, got {label_budget}")
    if encoder == "model" and old_model is None:
        raise IdealError("choose the model to continue from: continuing needs an old model")
    if encoder == "model":  # the old model's architecture, preprocessing and postprocessing come with its weights
        network_flags, plan_flags = [], ["--init-from", str(old_model.path)]
    else:
        network_flags, plan_flags = architecture_flags(old_model.card, old_model.display_name) if old_model else ([], [])
    encoder_flags = network_flags[: network_flags.index("--decoders")] if network_flags else []  # pretrain has no decoders
    plan: list[tuple[str, list[str]]] = []
    pretrained: Path | None = None
    if encoder == "pretrain":
        data = ["--data", f"folder:{run.train_dir}"] + (["--data", f"folder:{run.unlabeled_dir}"] if run.unlabeled_dir else [])
        plan.append((PRETRAIN_PHASE, [
            "pretrain", *data, "--iterations", str(pretrain_iterations), "--out", str(run.encoder),
            "--checkpoint-dir", str(run.run_dir / "encoder-checkpoints"), "--device", device,
            *encoder_flags, *plan_flags,
        ]))
        pretrained = run.encoder
    elif encoder == "reuse":
        if encoder_path is None or str(encoder_path) in ("", ".") or not Path(encoder_path).exists():
            raise IdealError("choose the pretrained encoder bundle to reuse (a folder or .zip made by idealtrain pretrain)")
        check_encoder(encoder_path, old_model)
        pretrained = Path(encoder_path)
    options = ["--checkpoint-dir", str(run.run_dir / "checkpoints"), *network_flags, *plan_flags]
    if old_model is not None and encoder != "model":
        from IDEALTrain.model.postprocessing import Postprocessing

        largest = Postprocessing.from_json(old_model.card.get("postprocessing", {})).largest_heart_component
        options += ["--largest-component", "on" if largest else "off"]
    if run.held_out_dir is not None:
        options += ["--val", f"folder:{run.held_out_dir}", "--keep", "last"]
    if label_budget:
        options += ["--labeled-slices", str(label_budget)]
    if old_model is not None:
        options += ["--id", old_model.model_id, "--version", next_patch_version(old_model.version)]
    arguments = finetune_arguments(
        corrections_dir=run.train_dir, out=run.bundle, iterations=iterations, pretrained=pretrained,
        unlabeled=run.unlabeled_dir, device=device, extra=[*options, *extra],
    )
    plan.append((FINETUNE_PHASE, arguments))
    return plan


# -- comparing old and new --------------------------------------------------------------------
@dataclass(frozen=True)
class ModelComparison:
    """Dice of the old and the new model on the same held-out cases: per class and the mean over classes."""

    cases: tuple[str, ...]
    old_dice: dict[str, float]
    new_dice: dict[str, float]
    old_mean: float
    new_mean: float

    def class_drops(self, tolerance: float = MAX_CLASS_DROP) -> dict[str, float]:
        """Classes on which the new model's Dice is more than ``tolerance`` below the old one's: name -> drop."""
        return {name: old - self.new_dice[name] for name, old in self.old_dice.items() if not self.new_dice[name] >= old - tolerance}

    def new_is_better(self, margin: float = 0.0) -> bool:
        """Whether switching is justified.

        Rule: the new mean Dice is strictly higher than the old one plus ``margin``, AND no class
        loses more than 0.05 Dice (:data:`MAX_CLASS_DROP`), so a better mean cannot hide a worse
        structure. Equal models are not better.
        """
        if margin < 0:
            raise IdealError(f"the margin must be 0 or more, got {margin}")
        values = [self.old_mean, self.new_mean, *self.old_dice.values(), *self.new_dice.values()]
        if not all(math.isfinite(v) for v in values):
            return False
        return self.new_mean > self.old_mean + margin and not self.class_drops()

    def summary(self) -> str:
        """Two lines for the status label: the numbers, then the verdict and why."""
        classes = ", ".join(f"{name} {old:.3f} -> {self.new_dice[name]:.3f}" for name, old in self.old_dice.items())
        text = (
            f"Mean Dice on {len(self.cases)} held-out case(s): old {self.old_mean:.3f}, new {self.new_mean:.3f} "
            f"({self.new_mean - self.old_mean:+.3f}); {classes}.\n"
        )
        if self.new_is_better():
            return text + "The new model is better."
        reasons = []
        if not self.new_mean > self.old_mean:
            reasons.append("its mean Dice is not higher")
        reasons += [f"{name} drops by {drop:.3f} (more than {MAX_CLASS_DROP})" for name, drop in self.class_drops().items()]
        return text + f"The new model is not better: {'; '.join(reasons) or 'a Dice value is undefined'}."


def compare_models(
    old_model: ModelEntry | str | Path,
    new_model: ModelEntry | str | Path,
    held_out_dir: str | Path | None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ModelComparison:
    """Segment every held-out case with both models and average their Dice (worker-thread safe: no scene).

    ``progress`` gets 0..1 over both models; ``cancel`` raises Cancelled between slices and cases.
    """
    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.evaluation.metrics import mean_scores, score

    from .inference import load_predictor, predict_volume

    if held_out_dir is None:
        raise IdealError("there are no held-out cases to compare the models on: review at least 3 cases before training")
    cases = load_cases(f"folder:{held_out_dir}", require_labels=True)
    predictors = [load_predictor(model, device) for model in (old_model, new_model)]
    label_maps = [[(label.value, label.segment_id) for label in p.bundle.labels] for p in predictors]
    if label_maps[0] != label_maps[1]:
        raise IdealError(f"the models segment different structures ({label_maps[0]} vs {label_maps[1]}): they cannot be compared")
    classes = dict(label_maps[0])
    steps = 2 * len(cases)
    results = []
    for number, predictor in enumerate(predictors):
        scores = []
        for index, case in enumerate(cases):
            done = number * len(cases) + index
            if cancel is not None:
                cancel.check("the model comparison")
            step = None if progress is None else (lambda fraction, done=done: progress((done + fraction) / steps))
            prediction = predict_volume(case.image, predictor, step, cancel)
            scores.append(score(prediction.labels, case.label, classes))
        averaged = mean_scores(scores)
        results.append(({name: float(values["dice"]) for name, values in averaged["classes"].items()}, float(averaged["mean"]["dice"])))
    (old_dice, old_mean), (new_dice, new_mean) = results
    return ModelComparison(tuple(case.name for case in cases), old_dice, new_dice, old_mean, new_mean)


# -- the comparison as a table ----------------------------------------------------------------
def comparison_table(scene: object, comparison: ModelComparison, old_name: str, name: str = "IDEALTrainer old vs new Dice") -> object:
    """A NEW table node (unique name): one row per class and the mean; columns Class, Old, New, Change.

    The held-out case names are kept as an attribute, so :func:`comparison_from_table` reads the
    whole comparison back, also after the scene was saved and reloaded.
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
    table.SetColumnDescription("New", "Dice of the newly trained model on the held-out reviewed cases")
    table.SetColumnDescription("Change", "new minus old Dice")
    table.SetAttribute(TABLE_KIND_ATTRIBUTE, "1")
    table.SetAttribute(TABLE_CASES_ATTRIBUTE, json.dumps(list(comparison.cases)))
    table.EndModify(was_modifying)
    return table


def comparison_from_table(table: object) -> ModelComparison:
    """The comparison a :func:`comparison_table` node holds (IdealError for any other table)."""
    contents = table.GetTable() if table is not None else None
    if contents is None or table.GetAttribute(TABLE_KIND_ATTRIBUTE) != "1" or contents.GetNumberOfColumns() < 3:
        raise IdealError(f"table {table.GetName() if table is not None else None!r} is not an old vs new model comparison")
    cases = tuple(json.loads(table.GetAttribute(TABLE_CASES_ATTRIBUTE) or "[]"))
    names, old, new = (contents.GetColumn(index) for index in range(3))
    rows = {names.GetValue(row): (float(old.GetValue(row)), float(new.GetValue(row))) for row in range(contents.GetNumberOfRows())}
    if MEAN_ROW not in rows:
        raise IdealError(f"table {table.GetName()!r} has no {MEAN_ROW} row: it is not an old vs new model comparison")
    means = rows.pop(MEAN_ROW)
    return ModelComparison(cases, {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}, means[0], means[1])
