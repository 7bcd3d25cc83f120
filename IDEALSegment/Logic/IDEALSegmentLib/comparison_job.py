"""Old model vs new model on the held-out reviewed cases and the non-site references, predicted in child processes
(no torch in Slicer).

``idealtrain evaluate --save-labels`` segments each data set once per model; the comparison is then
scored here, from those label files, by the rule of :mod:`.comparison`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.io.datasets import load_cases
from IDEALTrain.io.volume_files import read_image

from .comparison import ModelComparison, held_out_regions, load_references, score_models
from .folder_job import FolderJob
from .jobs import JobChain
from .registry import ModelEntry, read_bundle
from .worker import WorkerJob

MODELS = ("old", "new")


class ComparisonJob(FolderJob):
    """Both models segment the held-out cases in the background; :meth:`result` scores them."""

    def __init__(
        self, old_model: ModelEntry, new_bundle: Path, held_out_dir: Path | None, device: str = "auto",
        references: dict[str, str] | None = None,
    ) -> None:
        new_labels = [(label.value, label.segment_id) for label in ModelEntry("", "", Path(new_bundle), "", read_bundle(Path(new_bundle))[0]).labels]
        if [(label.value, label.segment_id) for label in old_model.labels] != new_labels:
            raise IdealError(f"{old_model.display_name} and {new_bundle} segment different structures: they cannot be compared")
        from .comparison import default_references

        self.models = {"old": Path(old_model.path), "new": Path(new_bundle)}
        self.held_out_dir, self.device = (Path(held_out_dir) if held_out_dir is not None else None), device
        try:
            self.references = default_references() if references is None else dict(references)
        except IdealError:
            self.references = {}
        self.folder: Path | None = None
        self.chain: JobChain | None = None

    def _sets(self) -> list[tuple[str, str]]:
        """(folder tag, data spec) of every data set both models segment."""
        held = [("held_out", f"folder:{self.held_out_dir}")] if self.held_out_dir is not None else []
        return held + [(f"ref{index}", spec) for index, spec in enumerate(self.references.values())]

    def start(self, work_root: Path | None = None) -> None:
        """Start ``idealtrain evaluate`` for the old, then the new model, on each data set."""
        self.folder = Path(tempfile.mkdtemp(prefix="IDEALTrainer-compare-", dir=work_root))
        steps = []
        for tag in MODELS:
            for set_tag, spec in self._sets():
                (self.folder / tag / set_tag).mkdir(parents=True)
                steps.append([
                    "evaluate", "--model", str(self.models[tag]), "--data", spec,
                    "--out", str(self.folder / f"{tag}-{set_tag}.json"), "--save-labels", str(self.folder / tag / set_tag),
                    "--device", self.device, "--progress-json",
                ])
        self.chain = JobChain(steps, log_path=self.folder / "compare.log", job_class=WorkerJob)
        self.chain.start()

    def result(self) -> ModelComparison:
        """The comparison scored from both models' label files (once done); the folder is removed."""
        if self.state != "done":
            raise IdealError(f"the model comparison is {self.state}, not done")
        try:
            held_out, regions, patients = [], {}, 0
            if self.held_out_dir is not None:
                held_out = load_cases(f"folder:{self.held_out_dir}", require_labels=True)
                regions, patients = held_out_regions(self.held_out_dir, held_out)
            refs, notes = load_references(self.references)
            tags = {"held_out": "held_out", **{name: f"ref{index}" for index, name in enumerate(self.references)}}

            def labels_of(tag: str, set_name: str, _index: int, case) -> object:
                return read_image(self.folder / tag / tags[set_name] / f"{case.name}.nrrd").array

            return score_models(held_out, regions, patients, refs, labels_of, notes)
        finally:
            self.discard()
