"""Old model vs new model on the held-out reviewed cases, predicted in child processes (no torch in Slicer).

``idealtrain evaluate --save-labels`` segments the held-out cases once per model; the comparison is
then scored here, from those label files, by the rule of :mod:`.comparison` (each structure only on
the slices where a clinician reviewed it).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.io.datasets import load_cases
from IDEALTrain.io.volume_files import read_image

from .comparison import TOO_FEW, ModelComparison, held_out_regions, model_score
from .folder_job import FolderJob
from .jobs import JobChain
from .registry import ModelEntry, read_bundle
from .worker import WorkerJob

MODELS = ("old", "new")


class ComparisonJob(FolderJob):
    """Both models segment the held-out cases in the background; :meth:`result` scores them."""

    def __init__(self, old_model: ModelEntry, new_bundle: Path, held_out_dir: Path | None, device: str = "auto") -> None:
        if held_out_dir is None:
            raise IdealError(f"there are no held-out cases to compare the models on ({TOO_FEW}): review at least 3 patients before training")
        new_labels = [(label.value, label.segment_id) for label in ModelEntry("", "", Path(new_bundle), "", read_bundle(Path(new_bundle))[0]).labels]
        if [(label.value, label.segment_id) for label in old_model.labels] != new_labels:
            raise IdealError(f"{old_model.display_name} and {new_bundle} segment different structures: they cannot be compared")
        self.models = {"old": Path(old_model.path), "new": Path(new_bundle)}
        self.held_out_dir, self.device = Path(held_out_dir), device
        self.folder: Path | None = None
        self.chain: JobChain | None = None

    def start(self, work_root: Path | None = None) -> None:
        """Start ``idealtrain evaluate`` for the old, then the new model."""
        self.folder = Path(tempfile.mkdtemp(prefix="IDEALTrainer-compare-", dir=work_root))
        steps = []
        for tag in MODELS:
            (self.folder / tag).mkdir()
            steps.append([
                "evaluate", "--model", str(self.models[tag]), "--data", f"folder:{self.held_out_dir}",
                "--out", str(self.folder / f"{tag}.json"), "--save-labels", str(self.folder / tag),
                "--device", self.device, "--progress-json",
            ])
        self.chain = JobChain(steps, log_path=self.folder / "compare.log", job_class=WorkerJob)
        self.chain.start()

    def result(self) -> ModelComparison:
        """The comparison scored from both models' label files (once done); the folder is removed."""
        if self.state != "done":
            raise IdealError(f"the model comparison is {self.state}, not done")
        try:
            cases = load_cases(f"folder:{self.held_out_dir}", require_labels=True)
            regions, patients = held_out_regions(self.held_out_dir, cases)
            scores = [model_score(cases, regions, lambda _i, case, tag=tag: read_image(self.folder / tag / f"{case.name}.nrrd").array) for tag in MODELS]
        finally:
            self.discard()
        (old_dice, old_mean), (new_dice, new_mean) = scores
        return ModelComparison(tuple(case.name for case in cases), old_dice, new_dice, old_mean, new_mean, patients)
