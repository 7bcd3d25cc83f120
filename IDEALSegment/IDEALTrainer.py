"""IDEALTrainer: improve an IDEALSegment model from the cases clinicians reviewed, without leaving Slicer.

Training runs as a separate process (IDEALSegmentLib.jobs.TrainingJob running ``idealtrain``) so Slicer
stays usable; this widget polls its JSON progress from a timer. Slicer imports this file at start-up:
no torch (or anything that needs it) at the top level.
"""
import enum
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


import IDEALSegmentPackages  # noqa: E402,F401  registers IDEALTrain and IDEALSegmentLib by name

TRAINING_DEVICE_KEY = "IDEALSegment/TrainingDevice"
TRAINING_FOLDER_KEY = "IDEALSegment/TrainingFolder"
POLL_MILLISECONDS = 250


def _segmentModule():
    """The IDEALSegment module file (shared settings and the dependency installer); loaded before this one."""
    import IDEALSegment

    return IDEALSegment


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


#
# IDEALTrainer
#


class IDEALTrainer(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IDEALTrainer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["IDEALSegment"]
        self.parent.contributors = ["IDEALSegment developers"]
        self.parent.helpText = """
Trains a new version of an IDEALSegment model on the cases marked as reviewed in IDEALSegment (and on an
unlabelled pool), in a background process, then compares old and new on held-out reviewed cases.
A new model is only used when you register it, as a new version; the old one stays installed.
"""
        self.parent.acknowledgementText = """
Method: Basak et al. (IDEAL), ICASSP 2023. Built on 3D Slicer's scripted module template.
"""


#
# IDEALTrainerParameterNode
#


@parameterNodeWrapper
class IDEALTrainerParameterNode:
    """Training options and the latest run; saved with the scene.

    encoderStart - pretrain, reuse an encoder bundle (pretrainedEncoder), start at random, or continue the current model.
    pretrainIterations / iterations - the budgets of the two phases.
    labelBudget - how many reviewed cases are used with their labels (0 = all); the rest are unlabelled.
    runFolder / newBundle - where the latest run wrote, and its trained bundle.
    comparisonTable - per-class Dice of the old and the new model on the held-out cases.
    """

    encoderStart: EncoderStart = EncoderStart.PRETRAIN
    pretrainedEncoder: Path
    pretrainIterations: Annotated[int, WithinRange(1, 1000000)] = 500
    iterations: Annotated[int, WithinRange(1, 1000000)] = 1000
    labelBudget: Annotated[int, WithinRange(0, 100000)] = 0
    runFolder: str = ""
    newBundle: str = ""
    comparisonTable: vtkMRMLTableNode
    statusText: str = ""


#
# IDEALTrainerWidget
#


class IDEALTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Shows the corrections data set, starts and follows training, compares and registers the result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobs = []  # (phase, arguments) still to run
        self._job = None
        self._phase = ""
        self._comparison = None  # IDEALSegment.BackgroundTask comparing old and new
        self._run = None  # the current run's folders (IDEALSegmentLib.retraining.RetrainingRun)
        self._oldEntry = None  # the model the new one is compared with
        self._device = "auto"
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IDEALTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IDEALTrainerModuleLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.refreshDatasetButton.connect("clicked(bool)", self.refreshDataset)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancel)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.ui.trainingDeviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.ui.trainingProgressBar.hide()
        self.ui.cancelTrainingButton.hide()
        self._fillDevices()
        self.refreshDataset()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        if self._job is not None and self._job.running:
            threading.Thread(target=self._job.cancel, daemon=True).start()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshDataset()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode: Optional[IDEALTrainerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _fillDevices(self) -> None:
        _segmentModule().fillDeviceComboBox(self.ui.trainingDeviceComboBox, TRAINING_DEVICE_KEY, "CPU (slow: use small budgets)")

    def onDeviceChanged(self, index: int) -> None:
        _segmentModule().setSettingsValue(TRAINING_DEVICE_KEY, self.ui.trainingDeviceComboBox.itemData(index) or "auto")

    # -- the corrections data set ---------------------------------------------------------------
    def refreshDataset(self) -> None:
        """Show the reviewed cases (who reviewed, which model drafted them) and the unlabelled pool."""
        folder = _segmentModule().correctionsFolder()
        self.ui.datasetFolderLabel.text = str(folder)
        table = self.ui.casesTableWidget
        table.setRowCount(0)
        try:
            summary, cases = self.logic.dataset(folder)
        except Exception as error:  # a broken manifest: say so, keep the module usable
            self.ui.datasetSummaryLabel.text = f"The training set cannot be read: {error}"
            return
        if summary is None:
            self.ui.datasetSummaryLabel.text = "No reviewed cases yet: use IDEALSegment > Mark reviewed and add to training set."
            return
        drafted = ", ".join(f"{name} ({count})" for name, count in summary["models"].items()) or "none"
        self.ui.datasetSummaryLabel.text = (
            f"{summary['cases']} reviewed case(s), {summary['reviewed_slices']} reviewed slice(s) recorded; "
            f"{summary['unlabeled_volumes']} unlabelled volume(s) in the pool.\nDrafted by: {drafted}"
        )
        headers = ["Case", "Kind", "Reviewed slices", "Drafted by", "Reviewer", "Added"]
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(cases))
        for row, case in enumerate(cases):
            model = case.get("model")
            slices = case.get("reviewed_slices")
            values = [
                case["case_id"],
                case["kind"],
                "all" if slices is None and case["kind"] == "labeled" else ", ".join(map(str, slices or [])),
                f"{model['model_id']} {model['model_version']}" if model else ("by hand" if case["kind"] == "labeled" else ""),
                case.get("reviewer") or "",
                case.get("exported_at") or "",
            ]
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(str(value)))
        table.resizeColumnsToContents()

    # -- state -> GUI ---------------------------------------------------------------------------
    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None or self._comparison is not None
        self.ui.trainButton.enabled = not busy
        self.ui.pretrainedEncoderPathLineEdit.enabled = p.encoderStart == EncoderStart.REUSE
        self.ui.pretrainIterationsSpinBox.enabled = p.encoderStart == EncoderStart.PRETRAIN
        self.ui.useModelButton.enabled = bool(p.newBundle) and Path(p.newBundle).exists() and not busy
        comparison = self.logic.comparison(p.comparisonTable)
        better = comparison is not None and comparison.new_is_better()
        self.ui.useModelButton.text = "Use this model" if better or not p.newBundle else "Use this model anyway..."
        if self.ui.comparisonTableView.mrmlTableNode() is not p.comparisonTable:
            self.ui.comparisonTableView.setMRMLTableNode(p.comparisonTable)

    # -- training -------------------------------------------------------------------------------
    def onTrain(self) -> None:
        segment = _segmentModule()
        if not segment.ensureDependencies(self.parent):
            return
        p = self._parameterNode
        device = self.ui.trainingDeviceComboBox.itemData(self.ui.trainingDeviceComboBox.currentIndex) or "auto"
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            oldEntry = segment.IDEALSegmentModuleLogic().currentEntry()
            runFolder = self.logic.newRunFolder()
            run = self.logic.prepareRun(segment.correctionsFolder(), runFolder)
            self._jobs = self.logic.trainingPlan(run, p.encoderStart, p.pretrainedEncoder, p.pretrainIterations, p.iterations, p.labelBudget, device, oldEntry)
            with slicer.util.NodeModify(p.parameterNode):
                p.runFolder = str(runFolder)
                p.newBundle = ""
                p.comparisonTable = None
                p.statusText = f"Training in {runFolder} ({len(run.train_cases)} training case(s), {len(run.held_out_cases)} held out)"
            self._run = run
            self._oldEntry = oldEntry
            self._device = device
            self._startNextJob()

    def _startNextJob(self) -> None:
        from IDEALSegmentLib.jobs import TrainingJob

        self._phase, arguments = self._jobs.pop(0)
        self._job = TrainingJob(arguments, log_path=Path(self._parameterNode.runFolder) / "training.log")
        self._job.start()
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.show()
        self.ui.cancelTrainingButton.show()
        self.ui.cancelTrainingButton.enabled = True
        self.ui.progressLabel.text = f"{self._phase}: starting..."
        self._timer.start()
        self._updateGui()

    def _poll(self) -> None:
        if self._comparison is not None:
            self._pollComparison()
            return
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            self._showEvent(event)
        if job.returncode is None:
            return
        job.wait()  # the process has ended: let the reader threads hand over the last lines
        for event in job.poll():
            self._showEvent(event)
        self._job = None
        if job.returncode == 0 and not job.cancelled:
            if self._jobs:
                self._startNextJob()
                return
            self._finishTraining()
            return
        self._timer.stop()
        self.ui.trainingProgressBar.hide()
        self.ui.cancelTrainingButton.hide()
        if job.cancelled or job.returncode == 3:
            self._parameterNode.statusText = f"Training cancelled; a checkpoint and the log are in {self._parameterNode.runFolder}."
        else:
            self._parameterNode.statusText = f"Training failed: {job.error or f'exit status {job.returncode}'}"
            slicer.util.errorDisplay(self._parameterNode.statusText + f"\n\nLog: {Path(self._parameterNode.runFolder) / 'training.log'}")
        self._updateGui()

    def _showEvent(self, event: dict) -> None:
        """One JSON progress event -> progress bar and the live line (phase, iteration, losses, ETA, Dice)."""
        kind = event.get("event")
        if kind == "progress":
            iteration, total = event.get("iteration", 0), event.get("total") or 1
            self.ui.trainingProgressBar.value = int(100 * iteration / total)
            losses = ", ".join(f"{key} {value:.3f}" for key, value in event.items() if "loss" in key and isinstance(value, (int, float)))
            eta = event.get("eta_s")
            self.ui.progressLabel.text = (
                f"{self._phase} ({event.get('phase', '')}): iteration {iteration}/{total}"
                + (f"; {losses}" if losses else "")
                + (f"; about {eta / 60:.0f} min left" if isinstance(eta, (int, float)) else "")
            )
        elif kind == "validation":
            dice = event.get("dice")
            if isinstance(dice, (int, float)):
                self.ui.validationLabel.text = f"Validation Dice on the held-out cases: {dice:.3f} (iteration {event.get('iteration', '?')})"
        elif kind == "log":
            logging.info("idealtrain: %s", event.get("text", ""))

    def _finishTraining(self) -> None:
        p = self._parameterNode
        p.newBundle = str(self._run.bundle)
        self.ui.progressLabel.text = "Training done."
        if not self._run.held_out_cases or self._oldEntry is None:
            self._timer.stop()
            self.ui.trainingProgressBar.hide()
            self.ui.cancelTrainingButton.hide()
            why = "no earlier model is installed to compare with" if self._run.held_out_cases else "review at least 3 cases to get a held-out comparison"
            p.statusText = f"New model trained: {p.newBundle} ({why})."
            self._updateGui()
            return
        segment = _segmentModule()
        run, old, device = self._run, self._oldEntry, self._device
        work = lambda progress, cancel: self.logic.compareModels(old, run.bundle, run.held_out_dir, device, progress, cancel)  # noqa: E731
        self.ui.progressLabel.text = "Comparing the old and the new model on the held-out cases..."
        self._comparison = segment.BackgroundTask(work)

    def _pollComparison(self) -> None:
        task = self._comparison
        self.ui.trainingProgressBar.value = int(100 * task.fraction)
        if not task.done:
            return
        self._comparison = None
        self._timer.stop()
        self.ui.trainingProgressBar.hide()
        self.ui.cancelTrainingButton.hide()
        p = self._parameterNode
        if task.error is not None:
            p.statusText = f"New model trained ({p.newBundle}), but the comparison failed: {task.error}"
        else:
            p.comparisonTable = self.logic.comparisonTable(slicer.mrmlScene, task.result, self._oldEntry)
            advice = "Use this model registers it as a new version." if task.result.new_is_better() else "Keeping the current model is advised."
            p.statusText = f"{task.result.summary()} {advice}"
        self.ui.progressLabel.text = ""
        self._updateGui()

    def onCancel(self) -> None:
        """Stop the whole training process tree (it saves a checkpoint first); Slicer stays responsive."""
        self.ui.cancelTrainingButton.enabled = False
        self.ui.progressLabel.text = "Cancelling (saving a checkpoint)..."
        self._jobs = []
        if self._job is not None:
            threading.Thread(target=self._job.cancel, name="IDEALTrainer cancel", daemon=True).start()
        if self._comparison is not None:
            self._comparison.cancel.cancel()

    def onUseModel(self) -> None:
        """Register the new bundle as a new version (never replacing one) and make it IDEALSegment's choice.

        Only a model that beat the old one on the held-out cases is switched to without asking.
        """
        p = self._parameterNode
        comparison = self.logic.comparison(p.comparisonTable)
        if comparison is None:
            question = "The new model was not compared with the current one on held-out reviewed cases, so it is not known to be better."
        elif not comparison.new_is_better():
            question = comparison.summary()
        else:
            question = None
        if question and not slicer.util.confirmYesNoDisplay(f"{question}\n\nUse the new model anyway?", windowTitle="IDEALTrainer"):
            return
        with slicer.util.tryWithErrorDisplay("The model could not be registered.", waitCursor=True):
            entry = self.logic.register(Path(p.newBundle))
            segment = _segmentModule()
            segment.setSettingsValue(segment.MODEL_KEY, f"{entry.model_id}@{entry.version}")
            p.statusText = f"Registered {entry.display_name} in {entry.path}; earlier versions stay available in IDEALSegment's model list."
            slicer.util.infoDisplay(p.statusText, windowTitle="IDEALTrainer")


#
# IDEALTrainerModuleLogic
#


class IDEALTrainerModuleLogic(ScriptedLoadableModuleLogic):
    """Training runs over IDEALSegmentLib (jobs, corrections, registry, inference); no Qt."""

    def getParameterNode(self) -> IDEALTrainerParameterNode:
        return IDEALTrainerParameterNode(super().getParameterNode())

    def dataset(self, folder: Path) -> tuple:
        """(summary, cases) of a corrections data set; (None, []) when it has no manifest yet."""
        from IDEALSegmentLib.corrections import MANIFEST_NAME, dataset_summary, read_manifest

        if not (Path(folder) / MANIFEST_NAME).is_file():
            return None, []
        return dataset_summary(folder), read_manifest(folder)

    def newRunFolder(self) -> Path:
        segment = _segmentModule()
        base = Path(segment.settingsValue(TRAINING_FOLDER_KEY, str(segment.modelsFolder().parent / "Training")))
        folder = base / time.strftime("run-%Y%m%d-%H%M%S")
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def prepareRun(self, correctionsFolder: Path, runFolder: Path):
        """Copy the reviewed cases into training and held-out folders (the data set is not changed)."""
        from IDEALSegmentLib.retraining import prepare_run

        return prepare_run(correctionsFolder, runFolder)

    def trainingPlan(self, run, encoderStart: EncoderStart, encoderPath, pretrainIterations: int, iterations: int, labelBudget: int, device: str, oldEntry) -> list:
        """[(phase, idealtrain arguments)]: optional pretraining, then finetuning with the old model's architecture."""
        from IDEALSegmentLib.retraining import training_plan

        encoder = {EncoderStart.PRETRAIN: "pretrain", EncoderStart.REUSE: "reuse", EncoderStart.RANDOM: "none", EncoderStart.CURRENT_MODEL: "model"}[encoderStart]
        return training_plan(
            run, encoder=encoder, encoder_path=encoderPath if encoder == "reuse" else None,
            pretrain_iterations=pretrainIterations, iterations=iterations, label_budget=labelBudget, device=device, old_model=oldEntry,
        )

    def compareModels(self, oldModel, newModel: Path, heldOutFolder: Path, device: str, progress=None, cancel=None):
        """Per-class and mean Dice of both models on the held-out cases (worker thread: no scene)."""
        from IDEALSegmentLib.retraining import compare_models

        return compare_models(oldModel, newModel, heldOutFolder, device, progress, cancel)

    def comparisonTable(self, scene, comparison, oldEntry) -> vtkMRMLTableNode:
        """A new table node: the old and the new model's Dice per class and their mean."""
        from IDEALSegmentLib.retraining import comparison_table

        return comparison_table(scene, comparison, oldEntry.display_name if oldEntry is not None else "old model")

    def comparison(self, table):
        """The comparison held by a comparison table, None when there is no (readable) one."""
        from IDEALSegmentLib.retraining import comparison_from_table
        from IDEALTrain.errors import IdealError

        if table is None:
            return None
        try:
            return comparison_from_table(table)
        except IdealError:
            return None

    def register(self, bundle: Path):
        return _segmentModule().IDEALSegmentModuleLogic().registry().register(bundle)


#
# IDEALTrainerTest
#


class IDEALTrainerTest(ScriptedLoadableModuleTest):
    """Runs in Slicer's --testing mode: a tiny training job through the Logic, then the new model loads."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_training_and_new_version()

    def test_tiny_training_and_new_version(self):
        from IDEALSegmentLib.selftest import run_selftest_scenario

        self.assertTrue(_segmentModule().ensureDependencies(), "the test needs PyTorch")
        work = Path(slicer.app.temporaryPath) / "IDEALTrainerTest" / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True)
        report = run_selftest_scenario(slicer.mrmlScene, work, progress=self.delayDisplay)
        self.assertEqual(report["training_returncode"], 0)
        self.assertTrue(Path(report["trained_bundle"]).exists())
        self.assertNotEqual(report["registered_version"], report["drafting_version"])
        self.assertEqual(report["loaded_model"], f"{report['registered_id']} {report['registered_version']}")
        self.delayDisplay("IDEALTrainer test passed")
