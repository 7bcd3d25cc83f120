"""The IDEALTrainer comparison in child processes (``idealtrain evaluate --save-labels``) equals the in-process one."""
from __future__ import annotations

import time

from helpers import import_slicer_core, varied_bundle

slicer = import_slicer_core()

from IDEALSegmentLib.comparison import compare_models  # noqa: E402
from IDEALSegmentLib.comparison_job import ComparisonJob  # noqa: E402
from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402
from IDEALSegmentLib.retraining import prepare_run  # noqa: E402
from test_logic_comparison import export_cases  # noqa: E402

from IDEALTrain.model.bundle import save_bundle  # noqa: E402


def wait(job, timeout=180.0):
    deadline = time.monotonic() + timeout
    while job.poll() == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    return job.state


def test_the_comparison_in_child_processes_equals_the_in_process_one(tmp_path):
    patients = {f"p{n}": [f"p{n}_ed", f"p{n}_es"] for n in range(4)}
    data = export_cases(tmp_path / "corrections", patients, reviewed=["LV", "LV_Myocardium"])
    run = prepare_run(data, tmp_path / "run", hold_out_every=2)
    bundle = varied_bundle(0)
    bundle.model_id, bundle.version = "old-model", "1.0.0"
    save_bundle(bundle, tmp_path / "user" / "old-model-1.0.0")
    new = save_bundle(varied_bundle(5), tmp_path / "new")
    old = ModelRegistry(tmp_path / "user", tmp_path / "none").find("old-model")
    job = ComparisonJob(old, new, run.held_out_dir, device="cpu")
    job.start(tmp_path)
    assert wait(job) == "done", job.error
    result = job.result()
    expected = compare_models(old, new, run.held_out_dir, device="cpu")
    assert result == expected
    assert not job.folder.exists()


def test_no_held_out_cases_and_cancel(tmp_path):
    bundle = varied_bundle(0)
    bundle.model_id, bundle.version = "old-model", "1.0.0"
    save_bundle(bundle, tmp_path / "user" / "old-model-1.0.0")
    old = ModelRegistry(tmp_path / "user", tmp_path / "none").find("old-model")
    data = export_cases(tmp_path / "corrections", {"p0": ["p0_ed"], "p1": ["p1_ed"]})
    # No held-out patients (fewer than 3 reviewed): the non-site reference and the agreement are still compared.
    alone = ComparisonJob(old, old.path, None, device="cpu", references={"phantoms": f"folder:{data}"})
    alone.start(tmp_path)
    assert wait(alone) == "done", alone.error
    result = alone.result()
    assert result.cases == () and result.references[0].cases == 2 and result.references[0].old == result.references[0].new
    assert result.agreement is None  # the phantoms hold every structure: nothing there that nobody reviewed
    assert result.verdict() == "too few patients to tell"
    job = ComparisonJob(old, old.path, data, device="cpu")
    job.start(tmp_path)
    job.cancel()
    assert wait(job, 30) == "cancelled" and not job.folder.exists()
