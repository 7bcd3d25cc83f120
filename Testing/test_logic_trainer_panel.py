"""The IDEALTrainer panel's controller: a real (tiny) training run and comparison in child processes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402
from IDEALSegmentLib.selftest import SELFTEST_MODEL_ID, make_selftest_model  # noqa: E402
from IDEALSegmentLib.trainer_panel import EncoderStart, TrainerPanelController  # noqa: E402
from test_logic_comparison import export_cases  # noqa: E402


@dataclass
class TrainerParameters:
    encoderStart: EncoderStart = EncoderStart.RANDOM
    pretrainedEncoder: Path = Path()
    pretrainIterations: int = 1
    iterations: int = 2
    labelBudget: int = 0
    runFolder: str = ""
    newBundle: str = ""
    comparisonTable: object = None
    statusText: str = ""


def until_finished(panel, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = panel.poll()
        if result.finished:
            return result
        time.sleep(0.1)
    raise AssertionError("training did not end in time")


@pytest.fixture
def setup(tmp_path):
    patients = {f"p{n}": [f"p{n}_ed", f"p{n}_es"] for n in range(4)}
    data = export_cases(tmp_path / "corrections", patients, reviewed=["LV", "LV_Myocardium"])
    make_selftest_model(tmp_path / "user")  # a small model idealtrain can retrain like-for-like
    registry = ModelRegistry(tmp_path / "user", tmp_path / "none")
    return data, registry, tmp_path


def test_train_compare_and_register_a_new_version(setup):
    data, registry, tmp_path = setup
    panel = TrainerPanelController(TrainerParameters(), slicer.vtkMRMLScene(), registry)
    assert panel.state().train and not panel.state().use_model and not panel.state().encoder_path
    old = registry.find(SELFTEST_MODEL_ID)
    panel.start(data, tmp_path / "runs", old, device="cpu")
    assert panel.busy and not panel.state().train
    result = until_finished(panel)
    assert result.error is None, panel.p.statusText
    assert Path(panel.p.newBundle).is_dir() and panel.p.comparisonTable is not None, panel.p.statusText
    comparison = panel.comparison_result()
    assert comparison is not None and set(comparison.old_dice) == {"LV", "LV_Myocardium"}
    question = panel.use_model_question()
    assert (question is None) == comparison.new_is_better()
    assert panel.state().use_model
    entry = panel.register()
    assert entry.model_id == SELFTEST_MODEL_ID and entry.version == "0.0.2" and entry.source == "user"


def test_a_failing_run_is_reported_and_cancel_stops_it(setup):
    data, registry, tmp_path = setup
    panel = TrainerPanelController(TrainerParameters(), slicer.vtkMRMLScene(), registry)
    panel.start(data, tmp_path / "runs", registry.find(SELFTEST_MODEL_ID), device="no-such-device")
    result = until_finished(panel)
    assert result.error and "Training failed" in result.error and "training.log" in result.error
    assert not panel.busy and panel.p.newBundle == ""
    panel.p.iterations = 100000
    time.sleep(1.1)  # a new run folder name (one per second)
    panel.start(data, tmp_path / "runs", registry.find(SELFTEST_MODEL_ID), device="cpu")
    time.sleep(0.5)
    panel.cancel()
    result = until_finished(panel, 60)
    assert result.error is None and "cancelled" in panel.p.statusText


class ScriptedChain:
    """A JobChain stand-in that hands out prepared progress events, one batch per poll (the controller's timer ticks)."""

    state, step, fraction, error = "running", 0, 0.5, None

    def __init__(self, batches):
        self.batches = list(batches)

    def poll(self):
        return self.batches.pop(0) if self.batches else []


def test_the_progress_line_keeps_the_last_event_and_the_time_left_is_measured():
    """Issue 31: the line no longer flickers back to "starting..." between events; the estimate comes from this run's speed."""
    from IDEALSegmentLib.trainer_panel import SpeedMeter

    def event(iteration):
        return {"event": "progress", "phase": "finetune", "iteration": iteration, "total": 200, "loss": 0.5, "eta_s": 9999.0}

    panel = TrainerPanelController(TrainerParameters(), None, None)
    panel.phases = ["Finetuning"]
    panel.chain = ScriptedChain([[], [event(1)], [], [event(6)], []])
    times = [100.0, 110.0]  # iteration 1 at 100 s, iteration 6 at 110 s: 2 s per iteration
    panel.speed = SpeedMeter(clock=lambda: times.pop(0))
    lines = [panel.poll().line for _ in range(5)]
    assert lines[0] == "Finetuning: starting..."
    assert "iteration 1/200" in lines[1] and "measuring the speed" in lines[1] and "166 min" not in lines[1]
    assert lines[2] == lines[1]  # no new event: the last one stays
    assert "iteration 6/200" in lines[3] and "about 6 min left at the measured 2.0 s per iteration" in lines[3]  # 194 x 2 s
    assert lines[4] == lines[3]
