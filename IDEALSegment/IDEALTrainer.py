"""IDEALTrainer: improve an IDEALSegment model from the cases clinicians reviewed, without leaving Slicer.

Training and the old-vs-new comparison run as separate processes; the widget only binds Qt signals
to the trainer controller (IDEALSegmentLib.trainer_panel) and polls it from a timer. Slicer imports
this file at start-up: nothing here imports torch. On Slicer 5.6/5.8 (Python 3.9) the file still
imports and the panel shows one line saying which Slicer it needs (IDEALSegmentLib.slicer_support).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import IDEALSegmentPackages  # noqa: F401  makes IDEALTrain importable in developer mode
import qt
import slicer
import vtk
from IDEALSegmentGui import common, sample_data
from IDEALSegmentLib.registry import ModelRegistry, entry_key, select_entry
from IDEALSegmentLib.trainer_panel import DATASET_COLUMNS, EncoderStart, TrainerPanelController, dataset_overview
from slicer import vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

__all__ = ["EncoderStart", "IDEALTrainer", "IDEALTrainerLogic", "IDEALTrainerParameterNode", "IDEALTrainerTest", "IDEALTrainerWidget"]


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
        problem = common.unsupportedSlicer("IDEALTrainer")
        if problem:
            logging.warning(problem)
            self.parent.helpText = problem
            return
        # The extension's real-scan sample, offered in Sample Data > Cardiac MRI (IDEALSegment).
        slicer.app.connect("startupCompleted()", sample_data.registerSampleData)


@parameterNodeWrapper
class IDEALTrainerParameterNode:
    """Training options and the latest run; saved with the scene.

    encoderStart - pretrain, reuse an encoder bundle (pretrainedEncoder), start at random, or continue the current model.
    pretrainIterations / iterations - the budgets of the two phases.
    labelBudget - how many reviewed cases are used with their labels (0 = all); the rest are unlabelled.
    runFolder / newBundle - where the latest run wrote, and its trained bundle.
    comparisonTable - per-class Dice of the old and the new model on the held-out cases.
    """

    encoderStart: EncoderStart = EncoderStart.CURRENT_MODEL  # the default retraining: minutes, not an hour (issue 20)
    pretrainedEncoder: Path
    pretrainIterations: Annotated[int, WithinRange(1, 1000000)] = 500
    iterations: Annotated[int, WithinRange(1, 1000000)] = 200  # IDEALSegmentLib.retraining.ContinueSettings.iterations
    labelBudget: Annotated[int, WithinRange(0, 100000)] = 0
    runFolder: str = ""
    newBundle: str = ""
    comparisonTable: vtkMRMLTableNode
    statusText: str = ""


class IDEALTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Shows the corrections data set; binds Train, Cancel and Use this model to the trainer controller."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel: TrainerPanelController | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(common.POLL_MILLISECONDS)
        self._timer.timeout.connect(self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = common.unsupportedSlicer("IDEALTrainer")
        if problem:
            common.showUnsupported(self.layout, problem)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IDEALTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IDEALTrainerLogic()
        self.panel = TrainerPanelController(None, slicer.mrmlScene, ModelRegistry(user_dir=common.modelsFolder()))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.refreshDatasetButton.connect("clicked(bool)", lambda _checked: self.refreshDataset())
        self.ui.trainButton.connect("clicked(bool)", lambda _checked: self.onTrain())
        self.ui.cancelTrainingButton.connect("clicked(bool)", lambda _checked: self.onCancel())
        self.ui.useModelButton.connect("clicked(bool)", lambda _checked: self.onUseModel())
        self.ui.trainingDeviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.fillDevices()
        self.refreshDataset()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cancel()  # returns at once; the process tree saves a checkpoint and ends
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.panel is None:  # an unsupported Slicer: setup() showed why and built nothing
            return
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

    def setParameterNode(self, parameterNode: IDEALTrainerParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self.panel.p = parameterNode  # a running training keeps going (files only) across a scene close
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def fillDevices(self) -> None:
        """The device list (again after torch is installed: the probe then finds the GPUs)."""
        common.fillDeviceComboBox(self.ui.trainingDeviceComboBox, common.TRAINING_DEVICE_KEY, "CPU (slow: use small budgets)")

    def onDeviceChanged(self, index: int) -> None:
        common.setSettingsValue(common.TRAINING_DEVICE_KEY, common.comboData(self.ui.trainingDeviceComboBox))

    # -- the corrections data set ---------------------------------------------------------------
    def refreshDataset(self) -> None:
        """Show the reviewed cases (who reviewed, which model drafted them) and the unlabelled pool."""
        folder = common.correctionsFolder()
        self.ui.datasetFolderLabel.text = str(folder)
        table = self.ui.casesTableWidget
        table.setRowCount(0)
        try:
            summary, rows = self.logic.dataset(folder)
        except Exception as error:  # a broken manifest: say so, keep the module usable
            self.ui.datasetSummaryLabel.text = f"The training set cannot be read: {error}"
            return
        if summary is None:
            self.ui.datasetSummaryLabel.text = "No reviewed cases yet: use IDEALSegment > Mark reviewed and add to training set."
            return
        self.ui.datasetSummaryLabel.text = summary
        headers = list(DATASET_COLUMNS)
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(str(value)))
        table.resizeColumnsToContents()

    # -- state -> GUI ---------------------------------------------------------------------------
    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        state = self.panel.state()
        self.ui.statusLabel.text = p.statusText  # set here: Slicer 5.6's parameterNodeWrapper cannot bind a QLabel
        self.ui.trainButton.enabled = state.train
        self.ui.pretrainedEncoderPathLineEdit.enabled = state.encoder_path
        self.ui.pretrainIterationsSpinBox.enabled = state.pretrain_iterations
        self.ui.useModelButton.enabled = state.use_model
        self.ui.useModelButton.text = state.use_model_text
        self.ui.trainingProgressBar.visible = self.ui.cancelTrainingButton.visible = state.busy
        if self.ui.comparisonTableView.mrmlTableNode() is not p.comparisonTable:
            self.ui.comparisonTableView.setMRMLTableNode(p.comparisonTable)

    # -- training -------------------------------------------------------------------------------
    def onTrain(self) -> None:
        if not common.ensureDependencies(self.parent, onInstalled=self.fillDevices):
            return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            old = self.logic.currentModel(self.panel.registry)
            self.panel.start(common.correctionsFolder(), common.trainingFolder(), old, common.comboData(self.ui.trainingDeviceComboBox))
            self.ui.cancelTrainingButton.enabled = True
            self.ui.trainingProgressBar.value = 0
            self._timer.start()
        self._updateGui()

    def _poll(self) -> None:
        result = self.panel.poll()
        self.ui.trainingProgressBar.value = int(100 * result.fraction)
        if result.line:
            self.ui.progressLabel.text = result.line
        if result.validation:
            self.ui.validationLabel.text = result.validation
        if not result.finished:
            return
        self._timer.stop()
        self.ui.progressLabel.text = ""
        self._updateGui()
        if result.error:
            slicer.util.errorDisplay(result.error, windowTitle="IDEALTrainer")

    def onCancel(self) -> None:
        """Stop the whole training process tree (it saves a checkpoint first); returns at once."""
        self.ui.cancelTrainingButton.enabled = False
        self.ui.progressLabel.text = "Cancelling (saving a checkpoint)..."
        self.panel.cancel()

    def onUseModel(self) -> None:
        """Register the new bundle as a new version and make it IDEALSegment's choice (asking first unless it won)."""
        question = self.panel.use_model_question()
        if question and not slicer.util.confirmYesNoDisplay(f"{question}\n\nUse the new model anyway?", windowTitle="IDEALTrainer"):
            return
        with slicer.util.tryWithErrorDisplay("The model could not be registered.", waitCursor=True):
            entry = self.panel.register()
            common.setSettingsValue(common.MODEL_KEY, entry_key(entry))
            slicer.util.infoDisplay(self._parameterNode.statusText, windowTitle="IDEALTrainer")


class IDEALTrainerLogic(ScriptedLoadableModuleLogic):
    """The parameter node, the data set summary and the current model; model work runs in child processes."""

    def getParameterNode(self) -> IDEALTrainerParameterNode:
        return IDEALTrainerParameterNode(super().getParameterNode())

    def dataset(self, folder: Path) -> tuple:
        """(summary line, table rows) of a corrections data set; (None, []) when it has no manifest yet."""
        return dataset_overview(folder, self.getParameterNode().iterations)

    def currentModel(self, registry: ModelRegistry):
        """The model IDEALSegment uses (the user's last choice, else the default); None when none is installed."""
        return select_entry(registry.entries(), common.settingsValue(common.MODEL_KEY))


class IDEALTrainerTest(ScriptedLoadableModuleTest):
    """Runs in Slicer's --testing mode: a tiny training job through the Logic, then the new model loads."""

    def setUp(self):
        # Here, not in runTest: CTest's runner (slicer.testing.runUnitTest) calls each test_* method directly.
        reason = common.selfTestSkipReason("IDEALTrainer")
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_training_and_new_version()

    def test_tiny_training_and_new_version(self):
        from IDEALSegmentLib.selftest import run_selftest_scenario

        work = Path(slicer.app.temporaryPath) / "IDEALTrainerTest" / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True)
        report = run_selftest_scenario(slicer.mrmlScene, work, progress=self.delayDisplay)
        self.assertEqual(report["training_returncode"], 0)
        self.assertTrue(Path(report["trained_bundle"]).exists())
        self.assertNotEqual(report["registered_version"], report["drafting_version"])
        self.assertEqual(report["loaded_model"], f"{report['registered_id']} {report['registered_version']}")
        logging.info("IDEALTrainer self-test report: %s", report)
        self.delayDisplay("IDEALTrainer test passed")
