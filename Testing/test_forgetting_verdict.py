"""Issue 31: a deliberately forgetting plan (lr 0.01, no distillation, no mixing, nothing frozen) is "not better".

A small case: the shipped model is retrained for a few iterations on one phantom case whose LV alone was
reviewed, with the protections off; the module's comparison then scores the non-site reference (the
shipped Sunnybrook sample with its expert contours) and the agreement with the old model where nobody
reviewed. No held-out patient exists (one reviewed patient), so only forgetting can decide.
"""
from __future__ import annotations

from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALSegmentLib.comparison import NOT_BETTER, compare_models  # noqa: E402

from IDEALTrain.cli import main  # noqa: E402
from IDEALTrain.io.phantom import make_phantom  # noqa: E402
from IDEALTrain.io.sample_data import default_model_dir  # noqa: E402
from IDEALTrain.io.volume_files import write_image  # noqa: E402


def test_a_forgetting_plan_is_called_not_better(tmp_path):
    image, label = make_phantom(0, size=(64, 64, 3), spacing=(2.0, 2.0, 8.0))
    write_image(image, tmp_path / "scan.nii.gz")
    write_image(label, tmp_path / "labels.nii.gz")
    data = tmp_path / "corrections"
    assert main(["export-corrections", "--image", str(tmp_path / "scan.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"),
                 "--structures", "LV", "--no-pool", "--out", str(data)]) == 0
    shipped, forgetful = default_model_dir(), tmp_path / "forgetful"
    assert main(["finetune", "--preset", "continue", "--labeled", f"folder:{data}", "--init-from", str(shipped), "--supervised-only",
                 "--lr", "0.01", "--distill", "0", "--keep-old", "0", "--frozen-levels", "0", "--iterations", "8",
                 "--batch-size", "2", "--out", str(forgetful), "--device", "cpu"]) == 0
    comparison = compare_models(shipped, forgetful, None, device="cpu")  # the default reference: the shipped sample
    [reference] = comparison.references
    assert reference.cases == 2 and reference.new < reference.old - 0.01, comparison.summary()
    assert comparison.verdict() == NOT_BETTER and not comparison.new_is_better()
    assert "Verdict: the new model is not better: it loses" in comparison.summary()
