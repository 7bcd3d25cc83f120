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
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.io.atomic import atomic_path
from IDEALTrain.io.corrections import case_reviewed, corrections_provenance, reviewed_training_labels  # noqa: F401
from IDEALTrain.training.presets import CONTINUE, ContinueSettings  # noqa: F401  (one definition, also the CLI's --preset continue)

from .corrections import LABELED, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, read_manifest
from .jobs import finetune_arguments
from .registry import ModelEntry, next_patch_version

#: With at least MIN_PATIENTS_TO_HOLD_OUT reviewed patients, every HOLD_OUT_EVERY-th patient is held out.
HOLD_OUT_EVERY = 5
MIN_PATIENTS_TO_HOLD_OUT = 3
#: What the new model's card records about the corrections it learnt from (``--provenance``).
PROVENANCE_FILE = "corrections.json"
#: How the network starts: encoder pretrained in this run, encoder reused from a bundle, at random,
#: or the whole old model continued on the new cases ("model": the quickest, keeps what it learned).
ENCODER_STARTS = ("pretrain", "reuse", "none", "model")
PRETRAIN_PHASE, FINETUNE_PHASE = "Pretraining the encoder", "Finetuning"
RUN_RECORD = "run.json"




def estimate_text(reviewed: int, unlabelled: int, iterations: int | None = None, settings: ContinueSettings = CONTINUE) -> str:
    """What the panel shows before Train: the estimated minutes for so many reviewed and pool volumes, and on what it rests.

    Counts come from a run (``len(run.train_cases)``) or, before one exists, from ``dataset_summary``.
    """
    fast, slow = (settings.estimate_seconds(reviewed + unlabelled, iterations, bf16) / 60 for bf16 in (True, False))
    return (
        f"Estimated time: about {max(1, round(fast))} min for {iterations or settings.iterations} iterations on "
        f"{reviewed} reviewed and {unlabelled} unlabelled volume(s) on a 2-core CPU with bf16 "
        f"(about {max(1, round(slow))} min without bf16; longer while other programs use the CPU, much shorter on a GPU)."
    )


# -- preparing a run --------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainingRun:
    """The folders of one retraining run (all under ``run_dir``)."""

    run_dir: Path
    corrections_dir: Path
    train_cases: tuple[str, ...]
    held_out_cases: tuple[str, ...]
    unlabeled_dir: Path | None  # run_dir/unlabeled: the pool (less held-out patients) and the reviewed scans; None: supervised only

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

    def patients(self) -> dict[str, str]:
        """Case -> patient of this run's cases, as recorded at preparation (``run.json``)."""
        record = json.loads((self.run_dir / RUN_RECORD).read_text(encoding="utf-8"))
        return {case: patient or case for case, patient in (record.get("patients") or {}).items()}

    @property
    def log(self) -> Path:
        """The training log of the run."""
        return self.run_dir / "training.log"


def split_cases(
    case_ids: Sequence[str], hold_out_every: int = HOLD_OUT_EVERY, patients: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """(train, held out) case ids, in the given (manifest) order; a patient's cases always stay together.

    Rule: patients (``patients`` maps case -> patient; a case without one is its own patient) in order
    of first appearance. With fewer than 3 patients nothing is held out (all train). Otherwise every
    ``hold_out_every``-th patient (5th, 10th ...) is held out, or the last one when there is no such
    patient, so at least one patient is held out and at least two train.
    """
    if hold_out_every < 2:
        raise IdealError(f"hold_out_every must be at least 2 (1 would hold out every case), got {hold_out_every}")
    ids = list(case_ids)
    patient = {case: (patients or {}).get(case) or case for case in ids}
    order = list(dict.fromkeys(patient[case] for case in ids))
    held: list[str] = []
    if len(order) >= MIN_PATIENTS_TO_HOLD_OUT:
        held = order[hold_out_every - 1 :: hold_out_every] or order[-1:]
    return [case for case in ids if patient[case] not in held], [case for case in ids if patient[case] in held]


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


def _write_training_label(source: Path, target: Path, entry: dict) -> None:
    """The case's labels kept only where reviewed (partial labels, see IDEALTrain.training.partial_labels)."""
    from IDEALTrain.io.volume_files import read_image, write_image

    write_image(reviewed_training_labels(read_image(source), entry), target)


def _pool_files(corrections: Path, held_out_patients: set[str]) -> list[Path]:
    """The data set's unlabelled images, except the scans of held-out patients (their frames never reach training)."""
    from IDEALTrain.io.corrections import UNLABELED

    return [
        corrections / entry["files"]["image"] for entry in read_manifest(corrections)
        if entry["kind"] == UNLABELED and not (entry.get("patient_id") and entry["patient_id"] in held_out_patients)
    ]


def prepare_run(
    corrections_dir: str | Path, run_dir: str | Path, hold_out_every: int = HOLD_OUT_EVERY, *, pool: bool = True,
) -> RetrainingRun:
    """Copy the reviewed cases into ``run_dir/train`` and ``run_dir/held_out`` (see :func:`split_cases`).

    Training labels keep only what was reviewed (elsewhere they are partial or unlabelled); held-out
    labels are copied as they are, with a manifest of what was reviewed for the comparison. With
    ``pool`` (the default) ``run_dir/unlabeled`` gets the data set's unlabelled pool (less the
    held-out patients' scans) and the training cases' own images: retraining then never runs
    supervised-only on the corrections alone, which is what made it forget (README). ``pool=False``
    is that choice. The corrections data set is only read. ``run_dir`` must be new or empty; if
    copying fails it is left as it was. The split is recorded in ``run_dir/run.json``, the
    corrections in ``corrections.json``.
    """
    corrections, run_dir = Path(corrections_dir), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise IdealError(f"{run_dir} is not an empty folder: choose a new folder for the training run (nothing was changed)")
    if not (corrections / MANIFEST_NAME).is_file():
        raise IdealError(f"{corrections} is not a corrections data set (no {MANIFEST_NAME}): mark cases as reviewed in IDEALSegment first")
    cases = {case["case_id"]: case for case in read_manifest(corrections) if case["kind"] == LABELED}
    if not cases:
        raise IdealError(f"no reviewed cases in {corrections}: mark cases as reviewed in IDEALSegment first")
    patients = {case_id: entry.get("patient_id") or case_id for case_id, entry in cases.items()}
    train, held_out = split_cases(list(cases), hold_out_every, patients)
    held_patients = {patients[c] for c in held_out}
    leaked = held_patients & {patients[c] for c in train}
    if leaked:  # split_cases keeps patients together; this guards the rule itself
        raise IdealError(f"patient(s) {sorted(leaked)} would be on both sides of the hold-out split")
    pool_files = _pool_files(corrections, held_patients) if pool else []
    run = RetrainingRun(run_dir, corrections, tuple(train), tuple(held_out), run_dir / "unlabeled" if pool else None)
    existed = run_dir.exists()
    try:
        for folder, ids in ((run.train_dir, train), (run.run_dir / "held_out", held_out)):
            for case_id in ids:
                files = cases[case_id]["files"]
                for kind in ("image", "label"):
                    target = folder / f"{kind}s" / Path(files[kind]).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if kind == "label" and folder == run.train_dir:
                        _write_training_label(corrections / files[kind], target, cases[case_id])
                    else:
                        shutil.copy2(corrections / files[kind], target)
        if pool:
            pool_dir = run.unlabeled_dir / "images"
            pool_dir.mkdir(parents=True, exist_ok=True)
            for path in pool_files:
                shutil.copy2(path, pool_dir / path.name)
            scans = {(e.get("source") or {}).get("image_sha256") for e in read_manifest(corrections) if e["kind"] != LABELED}
            for case_id in train:  # the reviewed volumes themselves, when their scans are not in the pool yet
                digest = (cases[case_id].get("source") or {}).get("image_sha256")
                if digest is None or digest not in scans:
                    shutil.copy2(corrections / cases[case_id]["files"]["image"], pool_dir / f"reviewed_{Path(cases[case_id]['files']['image']).name}")
        if held_out:
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "cases": [cases[c] for c in held_out]}
            with atomic_path(run.run_dir / "held_out" / MANIFEST_NAME) as temp:
                temp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        with atomic_path(run_dir / PROVENANCE_FILE) as temp:
            temp.write_text(json.dumps(corrections_provenance([cases[c] for c in train]), indent=2), encoding="utf-8")
        record = {
            "corrections_dir": str(corrections), "hold_out_every": hold_out_every, "train_cases": train,
            "held_out_cases": held_out, "unlabeled_dir": str(run.unlabeled_dir) if run.unlabeled_dir else None,
            "unlabeled_volumes": len(list((run.unlabeled_dir / "images").iterdir())) if pool else 0,
            "patients": patients,
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


def carried_flags(card: dict) -> list[str]:
    """Flags that keep a card's augmentation ranges and float16 storage in a model trained anew (``--init-from`` keeps them itself)."""
    augmentation = ((card.get("training") or {}).get("recipe") or {}).get("augmentation") or {}
    flags = []
    if "rotation_degrees" in augmentation:
        flags += ["--rotation", str(augmentation["rotation_degrees"])]
    if len(augmentation.get("scale_range") or ()) == 2:
        flags += ["--scale-range", *(str(v) for v in augmentation["scale_range"])]
    return flags + (["--half"] if (card.get("weights") or {}).get("dtype") == "float16" else [])


def check_encoder(encoder_path: str | Path, old_model: ModelEntry | None) -> None:
    """Refuse a bundle that is no pretrained encoder, or whose encoder differs from the old model's."""
    from IDEALTrain.model.card import read_card  # torch-free: this runs in Slicer's process

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
    iterations: int | None = None,
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
    ``encoder="model"`` uses :data:`CONTINUE` (frozen levels, distillation, crops; its iterations
    unless ``iterations`` is given; 1000 for the other starts). The card records the corrections
    (``--provenance``). ``label_budget`` > 0 labels only the first N training cases; ``extra`` goes
    to finetuning. Every check runs before anything starts.
    """
    if iterations is None:
        iterations = CONTINUE.iterations if encoder == "model" else 1000
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
        options += carried_flags(old_model.card)
    if run.held_out_dir is not None:
        options += ["--val", f"folder:{run.held_out_dir}", "--keep", "last"]
    if label_budget:
        options += ["--labeled-slices", str(label_budget)]
    if old_model is not None:
        options += ["--id", old_model.model_id, "--version", next_patch_version(old_model.version)]
    if encoder == "model":
        options += CONTINUE.flags()
    if (run.run_dir / PROVENANCE_FILE).is_file():
        options += ["--provenance", str(run.run_dir / PROVENANCE_FILE)]
    arguments = finetune_arguments(
        corrections_dir=run.train_dir, out=run.bundle, iterations=iterations, pretrained=pretrained,
        unlabeled=run.unlabeled_dir, device=device, extra=[*options, *extra],
    )
    plan.append((FINETUNE_PHASE, arguments))
    return plan
