"""IDEALSegment: segment the LV blood pool, LV myocardium and RV of cardiac MRI inside 3D Slicer.

The widget only binds Qt signals to the panel controller (IDEALSegmentLib.panel), which makes every
decision; the network runs in a child process, so torch never enters Slicer's process. Slicer
imports this file at start-up: nothing here imports torch. On Slicer 5.6/5.8 (Python 3.9) the file
still imports and the panel shows one line saying which Slicer it needs (IDEALSegmentLib.slicer_support).
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
from IDEALSegmentGui import common, refine, review_controls, views
from IDEALSegmentLib.panel import SegmentPanelController, table_text
from IDEALSegmentLib.registry import ModelRegistry, entry_key
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: How long the models folder must stay unchanged before the registry is read again (typing a path).
FOLDER_SETTLE_MILLISECONDS = 800


class IDEALSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IDEALSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["IDEALSegment developers"]
        self.parent.helpText = """
Segments the LV blood pool, LV myocardium and RV in short-axis cardiac MRI (a volume, or every frame of a cine)
with the IDEAL two-decoder network, shows where the decoders disagree, measures EDV, ESV, SV, EF and
myocardial mass, and sends corrected cases to the training set used by the IDEALTrainer module.
See the <a href="https://github.com/idealsegment/IDEALSegment#readme">documentation</a>.
"""
        self.parent.acknowledgementText = """
Method: Basak et al., "Pseudo-label guided contrastive learning for semi-supervised medical image
segmentation" (IDEAL), ICASSP 2023. Built on 3D Slicer's scripted module template.
"""
        problem = common.unsupportedSlicer("IDEALSegment")
        if problem:
            logging.warning(problem)
            self.parent.helpText = problem
            return
        slicer.app.connect("startupCompleted()", common.loadTerminology)


@parameterNodeWrapper
class IDEALSegmentParameterNode:
    """What the module works on and produced; saved with the scene.

    inputVolume - the image to segment: a volume, or the volume a cine's browser shows (the whole cine is segmented).
    esVolume - optional end-systolic volume: with it, the inputVolume is end-diastole and measurements are made.
    modelKey - "<model id>@<version>" of the chosen model.
    withUncertainty / showUncertainty - make / overlay the decoder-disagreement (uncertainty) volume.
    segmentation / esSegmentation / uncertaintyVolume / measurementsTable - the latest results.
    reviewSlices - slice indices, most in need of review first; reviewPosition - the next one to show.
    statusText - what ran, where and how long it took.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    esVolume: vtkMRMLScalarVolumeNode
    modelKey: str = ""
    withUncertainty: bool = True
    showUncertainty: bool = False
    segmentation: vtkMRMLSegmentationNode
    esSegmentation: vtkMRMLSegmentationNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    measurementsTable: vtkMRMLTableNode
    reviewSlices: list[int]
    reviewPosition: Annotated[int, Minimum(0)] = 0
    statusText: str = ""


class IDEALSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and the panel controller; shows what the controller decides."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel: SegmentPanelController | None = None
        self.registry = ModelRegistry(user_dir=common.modelsFolder())
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.refineSection = None
        self._timer = qt.QTimer()
        self._timer.setInterval(common.POLL_MILLISECONDS)
        self._timer.timeout.connect(self._poll)
        self._folderTimer = qt.QTimer()
        self._folderTimer.setSingleShot(True)
        self._folderTimer.setInterval(FOLDER_SETTLE_MILLISECONDS)
        self._folderTimer.timeout.connect(self.onModelsFolderSettled)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = common.unsupportedSlicer("IDEALSegment")
        if problem:
            common.showUnsupported(self.layout, problem)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IDEALSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic, self.reviewControls = IDEALSegmentLogic(), review_controls.ReviewControls(self)  # ticks, pool (issue 20)
        self.panel = SegmentPanelController(None, slicer.modules.sequences.logic(), self.registry)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        bindings = [
            (self.ui.segmentButton, self.onSegment), (self.ui.cancelButton, self.onCancel),
            (self.ui.refreshModelsButton, self.refreshModels), (self.ui.nextReviewSliceButton, self.onNextReviewSlice),
            (self.ui.openSegmentEditorButton, self.onOpenSegmentEditor), (self.ui.markReviewedButton, self.onMarkReviewed),
            (self.ui.copyMeasurementsButton, self.onCopyMeasurements), (self.ui.saveMeasurementsButton, self.onSaveMeasurements),
            (self.ui.recomputeMeasurementsButton, self.onRecomputeMeasurements),
        ]
        for button, slot in bindings:
            button.connect("clicked(bool)", lambda _checked, slot=slot: slot())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", lambda _path: self._folderTimer.start())
        self.ui.correctionsFolderPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: common.setSettingsValue(common.CORRECTIONS_FOLDER_KEY, path)
        )
        self.ui.reviewerLineEdit.connect(
            "editingFinished()", lambda: common.setSettingsValue(common.REVIEWER_KEY, self.ui.reviewerLineEdit.text.strip())
        )
        self.ui.modelsFolderPathLineEdit.currentPath = str(common.modelsFolder())
        self.ui.correctionsFolderPathLineEdit.currentPath = str(common.correctionsFolder())
        self.ui.reviewerLineEdit.text = common.settingsValue(common.REVIEWER_KEY)
        self.fillDevices()
        self.initializeParameterNode()
        self.refineSection = refine.RefineSection.attach(self)  # click to fix (issue 19)

    def cleanup(self) -> None:
        """The widget goes away (Slicer exits, or Reload): stop every timer, observer and child process it started."""
        if self.panel is not None:
            self.panel.scene_closing()  # cancels a running job; nothing will be added
        if self.refineSection is not None:
            self.refineSection.cleanup()  # its timer, its scene observer and its refinement job
            self.refineSection = None
        self._timer.stop()
        self._folderTimer.stop()
        self.removeObservers()
        common.stopWorkers()

    def enter(self) -> None:
        if self.panel is None:  # an unsupported Slicer: setup() showed why and built nothing
            return
        self.initializeParameterNode()
        if not common.missingPackages():
            self.panel.warm_up()  # a worker process imports torch now, not on the first Segment click

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.scene_closing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode: IDEALSegmentParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if parameterNode is None:
            return
        self.panel.p = parameterNode  # jobs cancelled by a scene close are still polled until they end
        self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)  # widgets with a SlicerParameterName
        self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self.refreshModels()

    # -- models and settings --------------------------------------------------------------------
    def refreshModels(self) -> None:
        """Fill the model selector from the registry (cards and checksums only: no torch)."""
        chosen = self.panel.refresh_models(common.settingsValue(common.MODEL_KEY))
        if self.panel.problems:
            logging.warning("IDEALSegment: unusable model bundles:\n" + "\n".join(self.panel.problems))
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in self.panel.entries:
            combo.addItem(entry.display_name, entry_key(entry))
            combo.setItemData(combo.count - 1, entry.training_summary, qt.Qt.ToolTipRole)
        if not self.panel.entries:
            combo.addItem("(no model installed)")
        combo.currentIndex = max(combo.findData(entry_key(chosen)), 0) if chosen else 0
        combo.blockSignals(wasBlocked)
        self._showModel(chosen)
        self._updateGui()

    def onModelChanged(self, index: int) -> None:
        entry = self.panel.choose_model(self.ui.modelComboBox.itemData(index) or "")
        if entry is not None:
            common.setSettingsValue(common.MODEL_KEY, entry_key(entry))
        self._showModel(entry)

    def _showModel(self, entry) -> None:
        if entry is None:
            self.ui.modelInfoLabel.text = f"No model is installed: put a model bundle into {self.registry.user_dir} and click Refresh."
            return
        dice = entry.validation_dice
        self.ui.modelInfoLabel.text = (
            f"Version {entry.version} ({entry.source})" + (f"; validation Dice {dice:.3f}" if dice is not None else "") + f"\n{entry.training_summary}"
        )

    def fillDevices(self) -> None:
        """The device list (again after torch is installed: the probe then finds the GPUs)."""
        common.fillDeviceComboBox(self.ui.deviceComboBox, common.DEVICE_KEY)

    def onDeviceChanged(self, index: int) -> None:
        common.setSettingsValue(common.DEVICE_KEY, common.comboData(self.ui.deviceComboBox))

    def onModelsFolderSettled(self) -> None:
        """The models folder path stopped changing: store it and list the models once."""
        path = self.ui.modelsFolderPathLineEdit.currentPath
        common.setSettingsValue(common.MODELS_FOLDER_KEY, path)
        self.registry.user_dir = Path(path)
        self.refreshModels()

    # -- state -> GUI ---------------------------------------------------------------------------
    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self.panel is None:
            return
        state = self.panel.state()
        self.ui.statusLabel.text = p.statusText  # set here: Slicer 5.6's parameterNodeWrapper cannot bind a QLabel
        self.ui.segmentButton.enabled = state.segment
        self.ui.segmentButton.toolTip = state.segment_tip
        self.ui.progressBar.visible = self.ui.cancelButton.visible = state.busy
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.openSegmentEditorButton.enabled = self.ui.markReviewedButton.enabled = state.review
        self.ui.showUncertaintyButton.enabled = state.uncertainty
        self.ui.nextReviewSliceButton.enabled = state.next_review_slice
        self.ui.copyMeasurementsButton.enabled = self.ui.saveMeasurementsButton.enabled = state.measurements
        self.ui.recomputeMeasurementsButton.enabled = state.recompute
        if self.ui.measurementsTableView.mrmlTableNode() is not p.measurementsTable:
            self.ui.measurementsTableView.setMRMLTableNode(p.measurementsTable)
        self.ui.qualityFlagsLabel.text = state.quality
        self.ui.qualityFlagsLabel.visible = bool(state.quality)
        views.showUncertainty(p.inputVolume, p.uncertaintyVolume if p.showUncertainty else None, p.uncertaintyVolume)

    # -- segmenting -----------------------------------------------------------------------------
    def onSegment(self) -> None:
        """Start the segmentation in a child process; the timer polls it and adds the results when done."""
        if not common.ensureDependencies(self.parent, onInstalled=self.fillDevices):
            return
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            self.panel.start(common.comboData(self.ui.deviceComboBox))
            self.ui.cancelButton.enabled = True
            self._timer.start()
        self._updateGui()

    def _poll(self) -> None:
        if self.panel is None or not self.panel.polling:
            self._timer.stop()
            return
        result = self.panel.poll()
        self.ui.progressBar.value = int(round(100 * result.fraction))
        if not result.finished:
            return
        self._updateGui()
        if result.error:
            slicer.util.errorDisplay(result.error, windowTitle="IDEALSegment")
        elif result.added is not None:
            self.ui.deviceUsedLabel.text = f"Ran on {result.added.device}"
            volume = self._parameterNode.inputVolume
            if volume is not None and self._parameterNode.segmentation is not None:
                views.showSegmentation(volume, self._parameterNode.segmentation)

    def onCancel(self) -> None:
        self.ui.cancelButton.enabled = False
        self.panel.cancel()

    # -- reviewing and correcting -----------------------------------------------------------------
    def onNextReviewSlice(self) -> None:
        """Jump the slice views to the next slice the decoders disagree on most."""
        with slicer.util.tryWithErrorDisplay("Could not jump to the slice.", waitCursor=False):
            _, (r, a, s), text = self.panel.next_review_slice()
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
            self.ui.reviewLabel.text = text

    def onOpenSegmentEditor(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentation)
        if p.inputVolume is not None:
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            setSource(p.inputVolume)

    def onMarkReviewed(self) -> None:
        """Export the (corrected) segmentation and its image, and for an ED/ES pair the ES one too, as cases."""
        p = self._parameterNode
        folder = Path(self.ui.correctionsFolderPathLineEdit.currentPath or common.correctionsFolder())
        reviewer = self.ui.reviewerLineEdit.text.strip()
        added = []
        with slicer.util.tryWithErrorDisplay("The case could not be added to the training set.", waitCursor=True):
            for endSystole in [False] + ([True] if p.esSegmentation is not None and p.esVolume is not None else []):
                existing = self.panel.existing_case(folder, endSystole)
                question = f"{existing} is already in the training set. Replace it with this segmentation?"
                if existing is not None and not slicer.util.confirmYesNoDisplay(question, windowTitle="IDEALSegment"):
                    continue
                added.append(self.panel.mark_reviewed(folder, reviewer, endSystole, existing is not None, self.reviewControls.structures()))
        if added:
            slicer.util.infoDisplay(
                "Added to the training set:\n" + "\n".join(map(str, added)) + "\n\nTrain an updated model in the IDEALTrainer module.",
                windowTitle="IDEALSegment",
            )

    # -- measurements ---------------------------------------------------------------------------
    def onCopyMeasurements(self) -> None:
        qt.QApplication.clipboard().setText(table_text(self._parameterNode.measurementsTable))
        self._parameterNode.statusText = "Measurements copied (tab-separated; paste into a spreadsheet or report)."

    def onSaveMeasurements(self) -> None:
        table = self._parameterNode.measurementsTable
        path = qt.QFileDialog.getSaveFileName(
            self.parent, "Save measurements", str(Path.home() / f"{table.GetName()}.csv"), "CSV (*.csv);;Tab-separated (*.tsv)"
        )
        if not path:
            return  # the dialog has already asked before replacing an existing file
        with slicer.util.tryWithErrorDisplay("Saving the measurements failed.", waitCursor=True):
            if not slicer.util.saveNode(table, path):
                raise RuntimeError(f"Slicer could not write {path}")
            self._parameterNode.statusText = f"Measurements saved to {path}"

    def onRecomputeMeasurements(self) -> None:
        with slicer.util.tryWithErrorDisplay("The measurements could not be recomputed.", waitCursor=True):
            self.panel.recompute_measurements()


class IDEALSegmentLogic(ScriptedLoadableModuleLogic):
    """The parameter node; the decisions are IDEALSegmentLib.panel's and the view changes IDEALSegmentGui.views'."""

    def getParameterNode(self) -> IDEALSegmentParameterNode:
        return IDEALSegmentParameterNode(super().getParameterNode())


class IDEALSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer's --testing mode: the self-test scenario, then the panel segmenting in a child process."""

    def setUp(self):
        # Here, not in runTest: CTest's runner (slicer.testing.runUnitTest) calls each test_* method directly.
        reason = common.selfTestSkipReason("IDEALSegment")
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scenario()
        self.setUp()
        self.test_panel_segments_in_a_child_process()

    def _workDir(self, name: str) -> Path:
        return Path(slicer.util.tempDirectory(f"IDEALSegmentTest-{name}"))

    def test_scenario(self):
        """Phantom -> segment -> check geometry and segment names -> export -> tiny training -> load the new model."""
        from IDEALSegmentLib.selftest import run_selftest_scenario

        self.delayDisplay("IDEALSegment self-test scenario")
        report = run_selftest_scenario(slicer.mrmlScene, self._workDir("scenario"), progress=self.delayDisplay, prefer_installed=True)
        self.assertEqual(report["segment_ids"], ["RV", "LV_Myocardium", "LV"])
        self.assertTrue(Path(report["correction"]).is_file())
        self.assertEqual(report["registered_source"], "user")
        self.delayDisplay("Scenario passed")

    def test_panel_segments_in_a_child_process(self):
        """The widget's Segment button, with a tiny model, adds a named segmentation while Slicer stays responsive."""
        from IDEALSegmentLib.selftest import make_selftest_model, selftest_phantom_volume

        work = self._workDir("widget")
        make_selftest_model(work / "models")
        slicer.util.selectModule("IDEALSegment")
        widget = slicer.modules.idealsegment.widgetRepresentation().self()
        previous = widget.registry.user_dir
        try:
            widget.registry.user_dir = work / "models"
            widget.refreshModels()
            widget._parameterNode.inputVolume = selftest_phantom_volume(slicer.mrmlScene)
            widget._parameterNode.esVolume = None
            widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findData("cpu")
            widget.onSegment()
            self.assertTrue(widget.panel.polling, "Segment did not start a job")
            deadline = time.time() + 120
            while widget.panel.polling and time.time() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertFalse(widget.panel.polling, "segmentation did not finish in 2 minutes")
            segmentation = widget._parameterNode.segmentation
            self.assertIsNotNone(segmentation, widget._parameterNode.statusText)
            self.assertEqual(list(segmentation.GetSegmentation().GetSegmentIDs()), ["RV", "LV_Myocardium", "LV"])
            self.assertIn("cpu", widget.ui.deviceUsedLabel.text)
        finally:
            widget.registry.user_dir = previous
            widget.refreshModels()
        self.delayDisplay("Panel test passed")
