"""The extension's self-test scenario as one function: the Slicer modules' self-tests and pytest both run it.

Phantom -> volume node -> segment (prediction in a worker thread, nodes added on the calling thread)
-> check geometry, segment IDs and names -> a "clinician" correction (the phantom's true labels)
exported to a corrections data set -> a retraining run prepared and planned by
:mod:`~IDEALSegmentLib.retraining` (the drafting model's architecture) -> a tiny ``idealtrain finetune``
job through :class:`~IDEALSegmentLib.jobs.TrainingJob` -> the result registered as a new model
version -> loaded.
Every file goes under ``work_dir``; the user's own model folder is never touched. torch is imported
only when the scenario runs.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from IDEALTrain.errors import IdealError
from IDEALTrain.labels import CARDIAC_LABELS

from .cancel import Cancelled, CancelToken

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


def _predict_in_worker(image, predictor, progress_values: list) -> object:
    """predict_volume in a worker thread, as the GUI runs it; the prediction or the worker's error."""
    from .inference import predict_volume

    outcome: dict = {}

    def work() -> None:
        try:
            outcome["prediction"] = predict_volume(image, predictor, progress_values.append, CancelToken())
        except BaseException as error:  # re-raised on the calling thread
            outcome["error"] = error

    worker = threading.Thread(target=work, name="selftest prediction")
    worker.start()
    worker.join(120)
    _check(not worker.is_alive(), "prediction did not finish within 2 minutes")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["prediction"]


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
    from IDEALTrain.model.bundle import load_bundle

    from .corrections import add_unlabeled_volume, export_correction, read_manifest
    from .inference import add_prediction_to_scene, load_predictor, node_ids, predict_volume
    from .jobs import TrainingJob
    from .registry import ModelRegistry, next_patch_version
    from .retraining import FINETUNE_PHASE, prepare_run, training_plan
    from .segmentations import labels_from_segmentation, replace_segments
    from .volumes import image_from_volume

    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(user_dir=work / "models", shipped_dir=work / "no-shipped-models")

    progress("Drafting model")
    drafting = None
    if prefer_installed:
        try:
            drafting = ModelRegistry().default()
        except IdealError:
            drafting = None
    if drafting is None:
        drafting = registry.register(make_selftest_model(work / "draft"))
    predictor = load_predictor(drafting, device)

    progress("Phantom volume")
    image, truth = selftest_phantom()
    volume = selftest_phantom_volume(scene)
    _check(image_from_volume(volume).same_grid(image), "the phantom volume node does not have the phantom's geometry")

    progress("Cancelled segmentation leaves the scene unchanged")
    before = node_ids(scene)
    token = CancelToken()
    token.cancel()
    try:
        predict_volume(image_from_volume(volume), predictor, cancel=token)
        raise SelftestFailure("a cancelled segmentation did not raise Cancelled")
    except Cancelled:
        pass
    _check(node_ids(scene) == before, "a cancelled segmentation changed the scene")

    progress("Segmenting in a worker thread")
    fractions: list = []
    prediction = _predict_in_worker(image_from_volume(volume), predictor, fractions)
    _check(fractions and abs(fractions[-1] - 1.0) < 1e-6, f"progress did not reach 1 (got {fractions[-3:]})")
    result = add_prediction_to_scene(volume, prediction, predictor.bundle, with_uncertainty=True)
    segmentation = result.segmentation
    contents = segmentation.GetSegmentation()
    segment_ids = [contents.GetNthSegmentID(index) for index in range(contents.GetNumberOfSegments())]
    _check(segment_ids == [label.segment_id for label in CARDIAC_LABELS], f"segment IDs {segment_ids}")
    names = [contents.GetSegment(segment_id).GetName() for segment_id in segment_ids]
    _check(names == [label.name for label in CARDIAC_LABELS], f"segment names {names}")
    _check(segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID(),
           "the segmentation does not use the volume as its reference geometry")
    read_back = labels_from_segmentation(segmentation, volume, CARDIAC_LABELS)
    _check(read_back.same_grid(image), "the segmentation does not lie on the volume's voxel grid")
    _check((read_back.array == prediction.labels.array).all(), "the segmentation differs from the prediction")
    _check(result.uncertainty is not None and image_from_volume(result.uncertainty).same_grid(image),
           "the uncertainty volume is missing or not on the volume's grid")
    _check(result.device == str(predictor.device) and result.seconds >= 0, f"result reports device {result.device}")

    progress("Exporting a correction")
    replace_segments(segmentation, truth, volume, [label.segment_id for label in CARDIAC_LABELS])
    corrections = work / "corrections"
    review = [r.slice_index for r in result.review[:2]]
    correction = export_correction(corrections, volume, segmentation, reviewer="selftest", reviewed_slices=review)
    _check(correction.is_file(), f"the correction {correction} was not written")
    manifest = read_manifest(corrections)
    _check([case["case_id"] for case in manifest] == [correction.name.split(".")[0]], f"manifest cases {manifest}")
    from IDEALTrain.io.volume_files import read_image

    exported = read_image(correction)
    _check(exported.same_grid(image) and (exported.array == truth.array).all(), "the exported labels are not the corrected ones")
    pool_volume = selftest_phantom_volume(scene, seed=8, name="IDEALSegment selftest unlabelled")
    add_unlabeled_volume(corrections, pool_volume)

    progress("Training a tiny model in a background process")
    run = prepare_run(corrections, work / "run")
    _check(run.train_cases == (manifest[0]["case_id"],) and not run.held_out_cases, f"run split {run}")
    plan = training_plan(run, encoder="none", iterations=iterations, device=device, old_model=drafting, extra=TINY_TRAINING_FLAGS)
    _check([phase for phase, _ in plan] == [FINETUNE_PHASE], f"training plan {plan}")
    arguments = plan[0][1]
    _check("--unlabeled" in arguments, f"the unlabelled pool was not used: {arguments}")
    trained = run.bundle
    job = TrainingJob(arguments, log_path=run.log)
    job.start()
    events: list = []
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while job.returncode is None and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.1)
    if job.returncode is None:
        job.cancel()
        raise SelftestFailure(f"training did not finish within {TRAINING_TIMEOUT_S} s")
    job.wait()
    events += job.poll()
    _check(job.returncode == 0, f"training failed (exit status {job.returncode}): {job.error}")
    kinds = [event.get("event") for event in events]
    _check("progress" in kinds and "done" in kinds, f"training reported no progress/done events ({kinds[-5:]})")
    trained_bundle = load_bundle(trained)
    _check(trained_bundle.model_id == drafting.model_id, "the trained bundle does not carry the drafting model's id")
    _check(trained_bundle.network == predictor.bundle.network and trained_bundle.preprocessing == predictor.bundle.preprocessing,
           "the trained model does not have the drafting model's architecture and preprocessing")

    progress("Registering and loading the new model")
    # A drafting model installed elsewhere is not in the scenario's registry: ask for its next version.
    in_registry = Path(drafting.path).parent == registry.user_dir
    registered = registry.register(trained, None if in_registry else next_patch_version(drafting.version))
    _check(registered.version != drafting.version, f"the new model was registered over version {drafting.version}")
    versions = [e.version for e in registry.entries() if e.model_id == drafting.model_id]
    if in_registry:
        _check(drafting.version in versions, "registering the new model removed the old version")
    new_predictor = load_predictor(registry.find(registered.model_id, registered.version), device)
    _check(new_predictor.predict(image).labels.same_grid(image), "the new model's labels are not on the image grid")

    return {
        "volume": volume,
        "segmentation": segmentation,
        "segment_ids": segment_ids,
        "segment_names": names,
        "device": result.device,
        "summary": result.summary(),
        "correction": str(correction),
        "training_returncode": job.returncode,
        "training_events": len(events),
        "trained_bundle": str(trained),
        "drafting_id": drafting.model_id,
        "drafting_version": drafting.version,
        "registered_id": registered.model_id,
        "registered_version": registered.version,
        "registered_source": registered.source,
        "registered_versions": versions,
        "loaded_model": f"{new_predictor.bundle.model_id} {new_predictor.bundle.version}",
        "seconds": time.perf_counter() - started,
    }
