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

from .comparison import BETTER, MIN_PATIENTS_FOR_VERDICT, TOO_FEW, comparison_from_table, comparison_table
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


#: Iterations whose measured speed gives the time estimate (the first ones include start-up; fewer say too little).
SPEED_ITERATIONS = 5


class SpeedMeter:
    """Time left from the measured speed of this run's iterations (not from a table measured elsewhere).

    The first progress event of a phase starts the clock; from :data:`SPEED_ITERATIONS` iterations
    after it, seconds per iteration = elapsed / iterations done since then.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.start: tuple[str, int, float] | None = None  # (phase, iteration, time) of the first event

    def eta_seconds(self, phase: str, iteration: int, total: int) -> float | None:
        now = self.clock()
        if self.start is None or self.start[0] != phase or iteration < self.start[1]:
            self.start = (phase, iteration, now)
            return None
        done = iteration - self.start[1]
        if done < SPEED_ITERATIONS:
            return None
        return (now - self.start[2]) / done * max(total - iteration, 0)


def progress_line(phase: str, event: dict, eta: float | None = None) -> str:
    """One training progress event as the live line: phase, iteration, losses, time left (measured, when known)."""
    iteration, total = event.get("iteration", 0), event.get("total") or 1
    losses = ", ".join(f"{key} {value:.3f}" for key, value in event.items() if "loss" in key and isinstance(value, (int, float)))
    if eta is None:
        left = f"; measuring the speed (time left after {SPEED_ITERATIONS} iterations)"
    else:
        left = f"; about {max(1, round(eta / 60))} min left at the measured {eta / max(total - iteration, 1):.1f} s per iteration" if eta >= 60 \
            else "; less than a minute left"
    return f"{phase} ({event.get('phase', '')}): iteration {iteration}/{total}" + (f"; {losses}" if losses else "") + left


COMPARING = "Comparing the old and the new model (held-out patients, the non-site reference, unreviewed structures)..."


def advice(comparison) -> str:
    """What the user can do after a verdict (the same words in the status, the job message and Use this model)."""
    verdict = comparison.verdict()
    if verdict == BETTER:
        return "Use this model registers it as a new version."
    if verdict == TOO_FEW:
        return "Use this model anyway only if you checked its segmentations yourself; otherwise keep the current model and review more patients."
    return "Keeping the current model is advised."


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
        self.line = ""  # the live progress line: kept until a new event arrives
        self.speed = SpeedMeter()

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

    def start(self, corrections_dir: Path, run_root: Path, old: ModelEntry | None, device: str = "auto", pool: bool = True) -> None:
        """Train Click: copy the reviewed cases into a new run folder and start the first training process.

        ``pool`` False is the deliberate choice to train supervised-only on the corrections alone (it forgets
        more: docs/retraining.md); by default the scans behind the reviewed cases are the unlabelled pool."""
        if self.busy:
            raise IdealError("a training run is already going on")
        p = self.p
        run_dir = Path(run_root) / time.strftime("run-%Y%m%d-%H%M%S")
        run = prepare_run(corrections_dir, run_dir, pool=pool)
        plan = training_plan(
            run, encoder=p.encoderStart.plan_name, encoder_path=p.pretrainedEncoder if p.encoderStart == EncoderStart.REUSE else None,
            pretrain_iterations=p.pretrainIterations, iterations=p.iterations, label_budget=p.labelBudget, device=device, old_model=old,
        )
        self.phases = [phase for phase, _ in plan]
        self.chain = JobChain([arguments for _, arguments in plan], log_path=run_dir / "training.log")
        self.run, self.old, self.device = run, old, device
        p.runFolder, p.newBundle, p.comparisonTable = str(run_dir), "", None
        patients = run.patients()
        held = {patients[c] for c in run.held_out_cases}
        p.statusText = (
            f"Training in {run_dir} on {len(set(patients.values()) - held)} patient(s) ({len(run.train_cases)} case(s)); "
            f"{len(held)} patient(s) held out for the comparison"
            + (f" (below {MIN_PATIENTS_FOR_VERDICT}: {TOO_FEW} whether it is better; the comparison still checks that it does not forget)"
               if len(held) < MIN_PATIENTS_FOR_VERDICT else "")
        )
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
        if not self.line.startswith(phase):
            self.line = f"{phase}: starting..."
        result = TrainerPoll(chain.fraction, self.line)
        for event in chain.poll():
            if event.get("event") == "progress":
                iteration, total = int(event.get("iteration", 0) or 0), int(event.get("total") or 1)
                eta = self.speed.eta_seconds(f"{phase}/{event.get('phase', '')}", iteration, total)
                self.line = result.line = progress_line(phase, event, eta)
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
        if self.old is None:
            p.statusText = f"New model trained: {p.newBundle} (no earlier model is installed to compare with)."
            return TrainerPoll(1.0, "Training done.", finished=True)
        self.comparison = ComparisonJob(self.old, self.run.bundle, self.run.held_out_dir, self.device)
        self.comparison.start()
        return TrainerPoll(0.0, COMPARING)

    def _poll_comparison(self) -> TrainerPoll:
        job, p = self.comparison, self.p
        if job.poll() == "running":
            return TrainerPoll(job.fraction, COMPARING)
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
        p.statusText = f"{result.summary()}\n{advice(result)}"
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
            return "The new model was not compared with the current one, so it is not known to be better."
        return None if comparison.new_is_better() else f"{comparison.summary()}\n{advice(comparison)}"

    def register(self) -> ModelEntry:
        """Register the new bundle as a new version (never replacing one)."""
        entry = self.registry.register(Path(self.p.newBundle))
        self.p.statusText = f"Registered {entry.display_name} in {entry.path}; earlier versions stay available in IDEALSegment's model list."
        return entry
