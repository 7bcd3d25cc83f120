"""The extension's self-test scenario as named steps: the Slicer modules' self-tests and pytest both run it.

Phantom -> volume node -> segment in a child process, as the panel does (a cancelled run first:
the scene stays unchanged) -> check geometry, segment IDs and names -> a "clinician" correction (the
phantom's true labels) exported to a corrections data set -> a retraining run prepared and planned
by :mod:`~IDEALSegmentLib.retraining` (the drafting model's architecture) -> a tiny ``idealtrain
finetune`` process -> the result registered as a new model version -> segmented with it.
Every file goes under ``work_dir``; the user's own model folder is never touched. Only
:func:`make_selftest_model` imports torch (to write an untrained bundle); every network runs in a
child process.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.labels import CARDIAC_LABELS

from .inference import node_ids
from .jobs import JobChain
from .panel import Parameters, SegmentPanelController
from .registry import ModelEntry, ModelRegistry, next_patch_version, read_bundle
from .segmentations import labels_from_segmentation, replace_segments
from .volumes import image_from_volume

SELFTEST_MODEL_ID = "idealsegment-selftest"
SELFTEST_VERSION = "0.0.1"
#: A phantom small enough to segment and train on in seconds on a CPU: (i, j, k) voxels and mm.
PHANTOM_SIZE = (48, 48, 6)
PHANTOM_SPACING = (2.5, 2.5, 8.0)
#: idealtrain flags that keep the self-test's training run small (the architecture comes from the drafting model).
TINY_TRAINING_FLAGS = ("--batch-size", "2", "--unlabeled-batch-size", "2", "--seed", "0")
TRAINING_TIMEOUT_S = 300


class SelftestFailure(AssertionError):
    """A check of the scenario failed (raised explicitly, so ``python -O`` cannot skip it)."""


def _check(condition: object, message: str) -> None:
    if not condition:
        raise SelftestFailure(message)


def make_selftest_model(folder: str | Path, seed: int = 0) -> Path:
    """Save an untrained two-decoder network, as small as possible, as a bundle in ``folder``; return its path.

    Its architecture and preprocessing are ones idealtrain's options reproduce, so it can be retrained.
    """
    import torch

    from IDEALTrain.model.bundle import Bundle, save_bundle
    from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork
    from IDEALTrain.model.preprocessing import Preprocessing

    torch.manual_seed(seed)
    config = NetworkConfig(base_channels=4, depth=3, decoders=("unet", "fpn"))
    plan = Preprocessing(inplane="size", size=(32, 32))
    bundle = Bundle(config, plan, SegmentationNetwork(config).state_dict(), model_id=SELFTEST_MODEL_ID, version=SELFTEST_VERSION)
    path = Path(folder) / f"{SELFTEST_MODEL_ID}-{SELFTEST_VERSION}"
    return save_bundle(bundle, path)


def selftest_phantom(seed: int = 7):
    """(image, true labels) of a small oblique, anisotropic phantom."""
    from IDEALTrain.io.phantom import make_phantom

    return make_phantom(seed, size=PHANTOM_SIZE, spacing=PHANTOM_SPACING)


def selftest_phantom_volume(scene: object, seed: int = 7, name: str = "IDEALSegment selftest phantom") -> object:
    """A new scalar volume node in ``scene`` holding :func:`selftest_phantom`'s image."""
    from .volumes import volume_from_image

    image, _ = selftest_phantom(seed)
    return volume_from_image(image, scene, name)


def _wait(chain: JobChain, seconds: float, what: str) -> str:
    """Poll a job chain (as the panel's timer does) until it ends; its state."""
    deadline = time.monotonic() + seconds
    while True:
        chain.poll()
        if chain.state != "running":
            return chain.state
        if time.monotonic() > deadline:
            chain.cancel()
            raise SelftestFailure(f"{what} did not finish within {seconds:.0f} s")
        time.sleep(0.05)


def _drafting_model(work: Path, registry: ModelRegistry, prefer_installed: bool) -> ModelEntry:
    """The installed default model (in Slicer), else a tiny untrained one registered in the scenario's folder."""
    if prefer_installed:
        try:
            return ModelRegistry().default()
        except IdealError:
            pass
    return registry.register(make_selftest_model(work / "draft"))


def _segment_in_child(scene: object, volume: object, model: ModelEntry, device: str, work: Path) -> object:
    """Segment ``volume`` through the panel controller (child process); a cancelled run first leaves the scene unchanged."""
    models = ModelRegistry(user_dir=Path(model.path).parent, shipped_dir=work / "no-shipped-models")
    panel = SegmentPanelController(Parameters(inputVolume=volume), None, models)
    panel.refresh_models()
    panel.choose_model(f"{model.model_id}@{model.version}")
    before = node_ids(scene)
    panel.start(device, work)
    panel.cancel()
    result = None
    while panel.polling:
        result = panel.poll()
        time.sleep(0.05)
    _check(result.finished and result.added is None and node_ids(scene) == before, "a cancelled segmentation changed the scene")
    panel.start(device, work)
    deadline = time.monotonic() + 120
    while not (result := panel.poll()).finished:
        _check(time.monotonic() < deadline, "segmentation did not finish within 2 minutes")
        time.sleep(0.05)
    _check(result.error is None and result.added is not None, f"segmentation failed: {result.error}")
    return result.added.results[0]


def _check_segmentation(result: object, volume: object, image: object) -> list[str]:
    """Segment IDs, names, reference geometry, grid and uncertainty of a segmentation result; the IDs."""
    segmentation = result.segmentation
    contents = segmentation.GetSegmentation()
    segment_ids = [contents.GetNthSegmentID(index) for index in range(contents.GetNumberOfSegments())]
    _check(segment_ids == [label.segment_id for label in CARDIAC_LABELS], f"segment IDs {segment_ids}")
    names = [contents.GetSegment(segment_id).GetName() for segment_id in segment_ids]
    _check(names == [label.name for label in CARDIAC_LABELS], f"segment names {names}")
    _check(segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID(),
           "the segmentation does not use the volume as its reference geometry")
    _check(labels_from_segmentation(segmentation, volume, CARDIAC_LABELS).same_grid(image), "the segmentation is not on the volume's grid")
    _check(result.uncertainty is not None and image_from_volume(result.uncertainty).same_grid(image),
           "the uncertainty volume is missing or not on the volume's grid")
    return segment_ids


def _export_correction(scene: object, volume: object, result: object, truth: object, corrections: Path) -> Path:
    """Correct the segmentation to the phantom's truth, export it, and add an unlabelled volume to the pool."""
    from IDEALTrain.io.volume_files import read_image

    from .corrections import add_unlabeled_volume, export_correction, read_manifest

    replace_segments(result.segmentation, truth, volume, [label.segment_id for label in CARDIAC_LABELS])
    review = [r.slice_index for r in result.review[:2]]
    correction = export_correction(corrections, volume, result.segmentation, reviewer="selftest", reviewed_slices=review)
    manifest = read_manifest(corrections)
    case_id = correction.name.split(".")[0]
    _check([(case["case_id"], case["kind"]) for case in manifest] == [(case_id, "labeled"), (f"{case_id}_scan", "unlabeled")],
           f"manifest cases (the reviewed case, and its scan in the pool) {manifest}")
    exported = read_image(correction)
    _check(exported.same_grid(truth) and (exported.array == truth.array).all(), "the exported labels are not the corrected ones")
    add_unlabeled_volume(corrections, selftest_phantom_volume(scene, seed=8, name="IDEALSegment selftest unlabelled"))
    return correction


def _train(corrections: Path, work: Path, drafting: ModelEntry, device: str, iterations: int) -> tuple[object, JobChain]:
    """A tiny finetuning run in a background process, with the drafting model's architecture."""
    from .retraining import FINETUNE_PHASE, prepare_run, training_plan

    run = prepare_run(corrections, work / "run")
    _check(len(run.train_cases) == 1 and not run.held_out_cases, f"run split {run}")
    plan = training_plan(run, encoder="none", iterations=iterations, device=device, old_model=drafting, extra=TINY_TRAINING_FLAGS)
    _check([phase for phase, _ in plan] == [FINETUNE_PHASE], f"training plan {plan}")
    _check("--unlabeled" in plan[0][1], f"the unlabelled pool was not used: {plan[0][1]}")
    chain = JobChain([plan[0][1]], log_path=run.log)
    chain.start()
    _check(_wait(chain, TRAINING_TIMEOUT_S, "training") == "done", f"training failed: {chain.error}")
    _check(any(event.get("event") == "done" for event in chain.events), "training reported no done event")
    card = read_bundle(run.bundle)[0]
    _check(card["id"] == drafting.model_id, "the trained bundle does not carry the drafting model's id")
    _check(card["architecture"] == drafting.card["architecture"] and card["preprocessing"] == drafting.card["preprocessing"],
           "the trained model does not have the drafting model's architecture and preprocessing")
    return run, chain


def run_selftest_scenario(
    scene: object,
    work_dir: str | Path,
    progress: Callable[[str], None] = print,
    *,
    prefer_installed: bool = False,
    device: str = "cpu",
    iterations: int = 2,
) -> dict:
    """Run the whole clinician-to-training loop on a phantom; return what it made and measured.

    ``prefer_installed`` drafts with the installed default model (shipped or the user's) when there
    is one, as in Slicer; otherwise (and in CI) with a tiny untrained model. Raises
    :class:`SelftestFailure` when a check fails.
    """
    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(user_dir=work / "models", shipped_dir=work / "no-shipped-models")

    progress("Drafting model")
    drafting = _drafting_model(work, registry, prefer_installed)
    progress("Phantom volume")
    image, truth = selftest_phantom()
    volume = selftest_phantom_volume(scene)
    _check(image_from_volume(volume).same_grid(image), "the phantom volume node does not have the phantom's geometry")
    progress("Segmenting in a child process (after a cancelled run)")
    result = _segment_in_child(scene, volume, drafting, device, work)
    segment_ids = _check_segmentation(result, volume, image)
    progress("Exporting a correction")
    correction = _export_correction(scene, volume, result, truth, work / "corrections")
    progress("Training a tiny model in a background process")
    run, chain = _train(work / "corrections", work, drafting, device, iterations)

    progress("Registering and loading the new model")
    # A drafting model installed elsewhere is not in the scenario's registry: ask for its next version.
    in_registry = Path(drafting.path).parent == registry.user_dir
    registered = registry.register(run.bundle, None if in_registry else next_patch_version(drafting.version))
    _check(registered.version != drafting.version, f"the new model was registered over version {drafting.version}")
    versions = [e.version for e in registry.entries() if e.model_id == drafting.model_id]
    if in_registry:
        _check(drafting.version in versions, "registering the new model removed the old version")
    new_result = _segment_in_child(scene, volume, registry.find(registered.model_id, registered.version), device, work)
    _check(new_result.model_version == registered.version, "the new model was not the one that segmented")
    return {
        "volume": volume,
        "segmentation": result.segmentation,
        "segment_ids": segment_ids,
        "segment_names": [label.name for label in CARDIAC_LABELS],
        "device": result.device,
        "summary": result.summary(),
        "correction": str(correction),
        "training_returncode": chain.job.returncode,
        "training_events": len(chain.events),
        "trained_bundle": str(run.bundle),
        "drafting_id": drafting.model_id,
        "drafting_version": drafting.version,
        "registered_id": registered.model_id,
        "registered_version": registered.version,
        "registered_source": registered.source,
        "registered_versions": versions,
        "loaded_model": f"{new_result.model_id} {new_result.model_version}",
        "seconds": time.perf_counter() - started,
    }
