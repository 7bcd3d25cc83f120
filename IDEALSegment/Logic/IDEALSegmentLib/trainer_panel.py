"""Every decision of the IDEALTrainer panel, without Qt: what is enabled, what Train starts (pretraining and
finetuning processes, then the old-vs-new comparison in child processes), what a finished run changes,
what a failure shows, and when "Use this model" must ask first.

Parameters are read and written through any object with the IDEALTrainer parameter node's attribute
names. Every call returns at once; the widget polls :meth:`TrainerPanelController.poll` from a timer.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path

from IDEALTrain.errors import IdealError

from .comparison import comparison_from_table, comparison_table
from .comparison_job import ComparisonJob
from .corrections import MANIFEST_NAME, dataset_summary, read_manifest
from .jobs import JobChain
from .registry import ModelEntry, ModelRegistry
from .retraining import estimate_text, prepare_run, training_plan

#: The columns of :func:`dataset_overview`'s rows.
DATASET_COLUMNS = ("Case", "Kind", "Reviewed slices", "Drafted by", "Reviewer", "Added")


class EncoderStart(enum.Enum):
    """How the shared encoder starts before finetuning."""

    PRETRAIN = "pretrain"
    REUSE = "reuse"
    RANDOM = "random"
    CURRENT_MODEL = "model"

    def label(self) -> str:
        return {
            "pretrain": "Pretrain on the reviewed cases and the pool first (IDEAL)",
            "reuse": "Reuse a pretrained encoder bundle",
            "random": "No pretraining (random start)",
            "model": "Continue training the current model (quickest)",
        }[self.value]

    @property
    def plan_name(self) -> str:
        """The name :func:`~.retraining.training_plan` uses for this start."""
        return "none" if self is EncoderStart.RANDOM else self.value


@dataclass
class Parameters:
    """The IDEALTrainer parameter node's fields, as a plain object (the web app, tests, scripts)."""

    encoderStart: EncoderStart = EncoderStart.CURRENT_MODEL
    pretrainedEncoder: Path = Path()
    pretrainIterations: int = 500
    iterations: int = 200  # retraining.ContinueSettings.iterations
    labelBudget: int = 0
    runFolder: str = ""
    newBundle: str = ""
    comparisonTable: object = None
    statusText: str = ""


@dataclass
class TrainerState:
    train: bool
    busy: bool
    encoder_path: bool
    pretrain_iterations: bool
    use_model: bool
    use_model_text: str


@dataclass
class TrainerPoll:
    fraction: float
    line: str = ""  # the live progress line
    validation: str = ""  # the latest validation Dice line
    finished: bool = False
    error: str | None = None  # shown in an error dialog


def progress_line(phase: str, event: dict) -> str:
    """One training progress event as the live line: phase, iteration, losses, time left."""
    iteration, total = event.get("iteration", 0), event.get("total") or 1
    losses = ", ".join(f"{key} {value:.3f}" for key, value in event.items() if "loss" in key and isinstance(value, (int, float)))
    eta = event.get("eta_s")
    return (
        f"{phase} ({event.get('phase', '')}): iteration {iteration}/{total}"
        + (f"; {losses}" if losses else "")
        + (f"; about {eta / 60:.0f} min left" if isinstance(eta, (int, float)) else "")
    )


def dataset_overview(folder: Path, iterations: int) -> tuple[str | None, list[list[str]]]:
    """(summary line, one row per case) of a corrections data set; (None, []) when it has no manifest yet."""
    if not (Path(folder) / MANIFEST_NAME).is_file():
        return None, []
    summary = dataset_summary(folder)
    drafted = ", ".join(f"{name} ({count})" for name, count in summary["models"].items()) or "none"
    line = (
        f"{summary['cases']} reviewed case(s), {summary['reviewed_slices']} reviewed slice(s) recorded; "
        f"{summary['unlabeled_volumes']} unlabelled volume(s) in the pool.\nDrafted by: {drafted}"
    )
    line += "\n" + estimate_text(summary["cases"], summary["unlabeled_volumes"], iterations)
    rows = []
    for case in read_manifest(folder):
        model, slices = case.get("model"), case.get("reviewed_slices")
        rows.append([
            case["case_id"], case["kind"],
            "all" if slices is None and case["kind"] == "labeled" else ", ".join(map(str, slices or [])),
            f"{model['model_id']} {model['model_version']}" if model else ("by hand" if case["kind"] == "labeled" else ""),
            case.get("reviewer") or "", case.get("exported_at") or "",
        ])
    return line, rows


class TrainerPanelController:
    """The IDEALTrainer panel's behaviour: one training run (and its comparison) at a time."""

    def __init__(self, parameters: object, scene: object, registry: ModelRegistry) -> None:
        self.p, self.scene, self.registry = parameters, scene, registry
        self.chain: JobChain | None = None
        self.phases: list[str] = []
        self.comparison: ComparisonJob | None = None
        self.run = None
        self.old: ModelEntry | None = None
        self.device = "auto"

    @property
    def busy(self) -> bool:
        return self.chain is not None or self.comparison is not None

    def state(self) -> TrainerState:
        p = self.p
        comparison = self.comparison_result()
        has_bundle = bool(p.newBundle) and Path(p.newBundle).exists()
        better = comparison is not None and comparison.new_is_better()
        return TrainerState(
            train=not self.busy,
            busy=self.busy,
            encoder_path=p.encoderStart == EncoderStart.REUSE,
            pretrain_iterations=p.encoderStart == EncoderStart.PRETRAIN,
            use_model=has_bundle and not self.busy,
            use_model_text="Use this model" if better or not p.newBundle else "Use this model anyway...",
        )

    def start(self, corrections_dir: Path, run_root: Path, old: ModelEntry | None, device: str = "auto") -> None:
        """Train Click: copy the reviewed cases into a new run folder and start the first training process."""
        if self.busy:
            raise IdealError("a training run is already going on")
        p = self.p
        run_dir = Path(run_root) / time.strftime("run-%Y%m%d-%H%M%S")
        run = prepare_run(corrections_dir, run_dir)
        plan = training_plan(
            run, encoder=p.encoderStart.plan_name, encoder_path=p.pretrainedEncoder if p.encoderStart == EncoderStart.REUSE else None,
            pretrain_iterations=p.pretrainIterations, iterations=p.iterations, label_budget=p.labelBudget, device=device, old_model=old,
        )
        self.phases = [phase for phase, _ in plan]
        self.chain = JobChain([arguments for _, arguments in plan], log_path=run_dir / "training.log")
        self.run, self.old, self.device = run, old, device
        p.runFolder, p.newBundle, p.comparisonTable = str(run_dir), "", None
        p.statusText = f"Training in {run_dir} ({len(run.train_cases)} training case(s), {len(run.held_out_cases)} held out)"
        if p.encoderStart.plan_name == "model":  # the estimate is measured for the default "continue the current model" plan
            pool = len(list((run.unlabeled_dir / "images").iterdir())) if run.unlabeled_dir else 0
            p.statusText += ". " + estimate_text(len(run.train_cases), pool, p.iterations)
        self.chain.start()

    def poll(self) -> TrainerPoll:
        """Timer tick: progress lines; the next step once one ends; the comparison table at the end."""
        if self.comparison is not None:
            return self._poll_comparison()
        chain = self.chain
        if chain is None:
            return TrainerPoll(0.0, finished=True)
        phase = self.phases[max(chain.step, 0)]
        result = TrainerPoll(chain.fraction, f"{phase}: starting...")
        for event in chain.poll():
            if event.get("event") == "progress":
                result.line = progress_line(phase, event)
            elif event.get("event") == "validation" and isinstance(event.get("dice"), (int, float)):
                result.validation = f"Validation Dice on the held-out cases: {event['dice']:.3f} (iteration {event.get('iteration', '?')})"
        result.fraction = chain.fraction
        if chain.state == "running":
            return result
        self.chain = None
        log = Path(self.p.runFolder) / "training.log"
        if chain.state == "cancelled":
            self.p.statusText = f"Training cancelled; a checkpoint and the log are in {self.p.runFolder}."
            return TrainerPoll(0.0, finished=True)
        if chain.state == "failed":
            self.p.statusText = f"Training failed: {chain.error}"
            return TrainerPoll(0.0, finished=True, error=f"{self.p.statusText}\n\nLog: {log}")
        return self._trained()

    def _trained(self) -> TrainerPoll:
        p = self.p
        p.newBundle = str(self.run.bundle)
        if not self.run.held_out_cases or self.old is None:
            why = "no earlier model is installed to compare with" if self.run.held_out_cases else "review at least 3 cases to get a held-out comparison"
            p.statusText = f"New model trained: {p.newBundle} ({why})."
            return TrainerPoll(1.0, "Training done.", finished=True)
        self.comparison = ComparisonJob(self.old, self.run.bundle, self.run.held_out_dir, self.device)
        self.comparison.start()
        return TrainerPoll(0.0, "Comparing the old and the new model on the held-out cases...")

    def _poll_comparison(self) -> TrainerPoll:
        job, p = self.comparison, self.p
        if job.poll() == "running":
            return TrainerPoll(job.fraction, "Comparing the old and the new model on the held-out cases...")
        self.comparison = None
        if job.state != "done":
            p.statusText = f"New model trained ({p.newBundle}), but the comparison {'was cancelled' if job.state == 'cancelled' else f'failed: {job.error}'}"
            return TrainerPoll(0.0, finished=True)
        try:
            result = job.result()
        except IdealError as error:
            p.statusText = f"New model trained ({p.newBundle}), but the comparison failed: {error}"
            return TrainerPoll(0.0, finished=True)
        p.comparisonTable = comparison_table(self.scene, result, self.old.display_name)
        advice = "Use this model registers it as a new version." if result.new_is_better() else "Keeping the current model is advised."
        p.statusText = f"{result.summary()} {advice}"
        return TrainerPoll(1.0, finished=True)

    def cancel(self) -> None:
        """Cancel Click (and scene close): stop the process tree; training saves a checkpoint first."""
        for job in (self.chain, self.comparison):
            if job is not None:
                job.cancel()

    def comparison_result(self):
        """The comparison held by the parameters' table, None when there is no (readable) one."""
        if self.p.comparisonTable is None:
            return None
        try:
            return comparison_from_table(self.p.comparisonTable)
        except IdealError:
            return None

    def use_model_question(self) -> str | None:
        """What to ask before registering the new model; None when it beat the old one on held-out cases."""
        comparison = self.comparison_result()
        if comparison is None:
            return "The new model was not compared with the current one on held-out reviewed cases, so it is not known to be better."
        return None if comparison.new_is_better() else comparison.summary()

    def register(self) -> ModelEntry:
        """Register the new bundle as a new version (never replacing one)."""
        entry = self.registry.register(Path(self.p.newBundle))
        self.p.statusText = f"Registered {entry.display_name} in {entry.path}; earlier versions stay available in IDEALSegment's model list."
        return entry
