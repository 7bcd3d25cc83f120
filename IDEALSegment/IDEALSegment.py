"""IDEALSegment: segment the LV blood pool, LV myocardium and RV of cardiac MRI inside 3D Slicer.

The widget only binds parameters, shows state and calls IDEALSegmentLib (Logic/ beside this file).
Slicer imports this file at start-up, so its top level imports no torch and nothing that needs it:
everything heavier is imported inside the methods that use it.
"""
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSequenceNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


import IDEALSegmentPackages  # noqa: E402,F401  registers IDEALTrain and IDEALSegmentLib by name

#: QSettings keys: choices that belong to the user, not to a scene.
MODELS_FOLDER_KEY = "IDEALSegment/ModelsFolder"
CORRECTIONS_FOLDER_KEY = "IDEALSegment/CorrectionsFolder"
DEVICE_KEY = "IDEALSegment/Device"
REVIEWER_KEY = "IDEALSegment/Reviewer"
MODEL_KEY = "IDEALSegment/LastModel"

#: Python packages the Logic needs beyond what Slicer ships (torch comes through PyTorchUtils).
EXTRA_REQUIREMENTS = {"safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.2"
POLL_MILLISECONDS = 100


# -- user settings and dependencies ---------------------------------------------------------------
def settingsValue(key: str, default: str = "") -> str:
    """A per-user setting (QSettings), ``default`` when unset."""
    value = qt.QSettings().value(key)
    return str(value) if value not in (None, "") else default


def setSettingsValue(key: str, value: str) -> None:
    qt.QSettings().setValue(key, value)


def cudaDevices() -> list:
    """[("cuda:0", "NVIDIA ..."), ...]; empty when torch is not installed (it is never installed here)."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [(f"cuda:{index}", torch.cuda.get_device_name(index)) for index in range(torch.cuda.device_count())]


def fillDeviceComboBox(combo, settingsKey: str, cpuLabel: str = "CPU") -> None:
    """auto, CPU and each CUDA device by name (when torch is installed); the user's last choice selected."""
    wasBlocked = combo.blockSignals(True)
    combo.clear()
    combo.addItem("auto (GPU if available)", "auto")
    combo.addItem(cpuLabel, "cpu")
    for device, name in cudaDevices():
        combo.addItem(f"{device}: {name}", device)
    combo.currentIndex = max(combo.findData(settingsValue(settingsKey, "auto")), 0)
    combo.blockSignals(wasBlocked)


def modelsFolder() -> Path:
    """Where the user's own models are registered (QSettings, else the Logic's default folder)."""
    from IDEALSegmentLib.registry import default_user_dir

    return Path(settingsValue(MODELS_FOLDER_KEY, str(default_user_dir())))


def correctionsFolder() -> Path:
    """The corrections data set that "Mark reviewed" adds to and IDEALTrainer trains on."""
    return Path(settingsValue(CORRECTIONS_FOLDER_KEY, str(modelsFolder().parent / "Corrections")))


def missingPackages() -> list:
    """Names of the Python packages the Logic needs that are not installed (nothing is imported)."""
    return [name for name in ("torch", *EXTRA_REQUIREMENTS) if importlib.util.find_spec(name) is None]


def ensureDependencies(parent=None) -> bool:
    """Install torch (through PyTorchUtils when available) and the small extras, after asking; True when ready.

    Called on the first Segment / Train click, never at import or module load. Slicer's own numpy
    and SimpleITK are left alone: none of the packages installed here requires them.
    """
    missing = missingPackages()
    if not missing:
        return True
    torchUtils = None
    if "torch" in missing:
        try:
            import PyTorchUtils

            torchUtils = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            torchUtils = None
    how = (
        "PyTorch will be installed by the PyTorch extension, which picks the build that matches your GPU"
        if torchUtils is not None
        else "PyTorch will be installed with pip (this can download more than 2 GB; the PyTorch extension from the "
        "Extensions Manager picks a GPU-matched build and is the better choice)"
    ) if "torch" in missing else ""
    extras = [name for name in missing if name != "torch"]
    text = (
        "IDEALSegment runs its neural network with PyTorch and needs these Python packages that are not "
        f"installed yet: {', '.join(missing)}.\n\n"
        + (how + ".\n" if how else "")
        + (f"Also installed with pip: {', '.join(EXTRA_REQUIREMENTS[name] for name in extras)}.\n" if extras else "")
        + "\nInstall now? This takes a few minutes; Slicer's own packages are not changed."
    )
    if not slicer.util.confirmOkCancelDisplay(text, windowTitle="IDEALSegment: install PyTorch", parent=parent):
        return False
    with slicer.util.tryWithErrorDisplay("Installing the packages failed; see the Python console for pip's message.", waitCursor=True):
        if "torch" in missing:
            if torchUtils is not None:
                if torchUtils.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    return False
            else:
                slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")
        if extras:
            slicer.util.pip_install(" ".join(EXTRA_REQUIREMENTS[name] for name in extras))
        importlib.invalidate_caches()
    still = missingPackages()
    if still:
        slicer.util.errorDisplay(f"Still missing after the installation: {', '.join(still)}. Restart Slicer and try again.")
        return False
    return True


class BackgroundTask:
    """Runs ``work(progress, cancel)`` in a worker thread; the GUI polls ``fraction`` / ``done`` from a QTimer.

    The work must not touch the scene (the Logic's predict functions do not): results are added on
    the main thread once ``done`` is seen. ``cancel`` is the Logic's CancelToken.
    """

    def __init__(self, work: Callable) -> None:
        from IDEALSegmentLib.cancel import CancelToken

        self.cancel = CancelToken()
        self.fraction = 0.0
        self.result = None
        self.error: Optional[BaseException] = None
        self.done = False
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(work,), name="IDEALSegment worker", daemon=True)
        self._thread.start()

    def _run(self, work: Callable) -> None:
        try:
            self.result = work(self._progress, self.cancel)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error
        finally:
            self.done = True

    def _progress(self, fraction: float) -> None:
        self.fraction = max(0.0, min(1.0, float(fraction)))


#
# IDEALSegment
#


class IDEALSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IDEALSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["IDEALSegment developers"]
        self.parent.helpText = """
Segments the LV blood pool, LV myocardium and RV in short-axis cardiac MRI (a volume or a cine sequence)
with the IDEAL two-decoder network, shows where the decoders disagree, measures EDV, ESV, SV, EF and
myocardial mass, and sends corrected cases to the training set used by the IDEALTrainer module.
See the <a href="https://github.com/idealsegment/IDEALSegment#readme">documentation</a>.
"""
        self.parent.acknowledgementText = """
Method: Basak et al., "Pseudo-label guided contrastive learning for semi-supervised medical image
segmentation" (IDEAL), ICASSP 2023. Built on 3D Slicer's scripted module template.
"""


#
# IDEALSegmentParameterNode
#


@parameterNodeWrapper
class IDEALSegmentParameterNode:
    """What the module works on and produced; saved with the scene.

    inputVolume - the image to segment: a scalar volume or a cine (volume sequence).
    esVolume - optional end-systolic volume: with it, the inputVolume is end-diastole and measurements are made.
    modelKey - "<model id>@<version>" of the chosen model.
    withUncertainty - also make the decoder-disagreement (uncertainty) volume.
    showUncertainty - overlay the uncertainty volume in the slice views.
    segmentation / esSegmentation / uncertaintyVolume / measurementsTable - the latest results.
    reviewSlices - slice indices, most in need of review first; reviewPosition - the next one to show.
    statusText - what ran, where and how long it took.
    """

    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]
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


#
# IDEALSegmentWidget
#


class IDEALSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node, runs segmentations in the background and shows the results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task: Optional[BackgroundTask] = None
        self._taskDone: Optional[Callable] = None
        self._entries = []
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self._pollTask)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IDEALSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IDEALSegmentModuleLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.nextReviewSliceButton.connect("clicked(bool)", self.onNextReviewSlice)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.markReviewedButton.connect("clicked(bool)", self.onMarkReviewed)
        self.ui.copyMeasurementsButton.connect("clicked(bool)", self.onCopyMeasurements)
        self.ui.saveMeasurementsButton.connect("clicked(bool)", self.onSaveMeasurements)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.ui.correctionsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCorrectionsFolderChanged)
        self.ui.reviewerLineEdit.connect("editingFinished()", self.onReviewerChanged)

        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.ui.modelsFolderPathLineEdit.currentPath = str(modelsFolder())
        self.ui.correctionsFolderPathLineEdit.currentPath = str(correctionsFolder())
        self.ui.reviewerLineEdit.text = settingsValue(REVIEWER_KEY)
        self._fillDevices()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        if self._task is not None:
            self._task.cancel.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

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
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode: Optional[IDEALSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._selectModel(self._parameterNode.modelKey or settingsValue(MODEL_KEY))
            self._updateGui()

    # -- models and devices ---------------------------------------------------------------------
    def refreshModels(self) -> None:
        """Fill the model selector from the registry (shipped and user bundles)."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._entries = []
        if "torch" in missingPackages():
            combo.addItem("(install PyTorch to list the models: click Segment)")
            self.ui.modelInfoLabel.text = "Models are verified with PyTorch, which is not installed yet."
        else:
            self._entries, problems = self.logic.modelEntries()
            for entry in self._entries:
                combo.addItem(entry.display_name, f"{entry.model_id}@{entry.version}")
                combo.setItemData(combo.count - 1, entry.training_summary, qt.Qt.ToolTipRole)
            if not self._entries:
                combo.addItem("(no model installed)")
            if problems:
                logging.warning("IDEALSegment: unusable model bundles:\n" + "\n".join(problems))
        combo.blockSignals(wasBlocked)
        key = (self._parameterNode.modelKey if self._parameterNode else "") or settingsValue(MODEL_KEY)
        self._selectModel(key)

    def _selectModel(self, key: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(key) if key else -1
        if index < 0 and self._entries:
            index = self._entries.index(self.logic.defaultEntry(self._entries))
        if index >= 0:
            combo.currentIndex = index
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index: int) -> None:
        entry = self._entries[index] if 0 <= index < len(self._entries) else None
        if entry is None:
            return  # refreshModels has said why there is none
        dice = entry.validation_dice
        self.ui.modelInfoLabel.text = (
            f"Version {entry.version} ({entry.source}); validation Dice {dice:.3f}" if dice is not None else f"Version {entry.version} ({entry.source})"
        ) + f"\n{entry.training_summary}"
        key = f"{entry.model_id}@{entry.version}"
        setSettingsValue(MODEL_KEY, key)
        if self._parameterNode and self._parameterNode.modelKey != key:
            self._parameterNode.modelKey = key

    def _selectedEntry(self):
        index = self.ui.modelComboBox.currentIndex
        if not 0 <= index < len(self._entries):
            from IDEALTrain.errors import IdealError

            raise IdealError(f"no model selected: put a model bundle into {modelsFolder()} (Settings) and click Refresh")
        return self._entries[index]

    def _fillDevices(self) -> None:
        fillDeviceComboBox(self.ui.deviceComboBox, DEVICE_KEY)

    def onDeviceChanged(self, index: int) -> None:
        setSettingsValue(DEVICE_KEY, self.ui.deviceComboBox.itemData(index) or "auto")

    def onModelsFolderChanged(self, path: str) -> None:
        setSettingsValue(MODELS_FOLDER_KEY, path)
        self.refreshModels()

    def onCorrectionsFolderChanged(self, path: str) -> None:
        setSettingsValue(CORRECTIONS_FOLDER_KEY, path)

    def onReviewerChanged(self) -> None:
        setSettingsValue(REVIEWER_KEY, self.ui.reviewerLineEdit.text.strip())

    # -- state -> GUI ---------------------------------------------------------------------------
    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._task is not None
        self.ui.segmentButton.enabled = bool(p.inputVolume) and not busy
        self.ui.segmentButton.toolTip = "Segment the selected image" if p.inputVolume else "Select an image (volume or cine) first"
        hasResult = bool(p.segmentation) and not busy
        self.ui.openSegmentEditorButton.enabled = hasResult
        self.ui.markReviewedButton.enabled = hasResult
        self.ui.showUncertaintyButton.enabled = bool(p.uncertaintyVolume) and not busy
        self.ui.nextReviewSliceButton.enabled = bool(p.uncertaintyVolume) and len(p.reviewSlices) > 0 and not busy
        self.ui.copyMeasurementsButton.enabled = bool(p.measurementsTable)
        self.ui.saveMeasurementsButton.enabled = bool(p.measurementsTable)
        if self.ui.measurementsTableView.mrmlTableNode() is not p.measurementsTable:
            self.ui.measurementsTableView.setMRMLTableNode(p.measurementsTable)
        self._showUncertainty(p.showUncertainty and bool(p.uncertaintyVolume))

    def _showUncertainty(self, show: bool) -> None:
        p = self._parameterNode
        volume = p.inputVolume if p.inputVolume and p.inputVolume.IsA("vtkMRMLScalarVolumeNode") else None
        compositeNodes = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        wanted = p.uncertaintyVolume.GetID() if show else None
        if all(node.GetForegroundVolumeID() == wanted for node in compositeNodes):
            return
        if show:
            slicer.util.setSliceViewerLayers(background=volume or "keep-current", foreground=p.uncertaintyVolume, foregroundOpacity=0.5)
        elif any(p.uncertaintyVolume and node.GetForegroundVolumeID() == p.uncertaintyVolume.GetID() for node in compositeNodes):
            slicer.util.setSliceViewerLayers(foreground=None)

    # -- segmenting -----------------------------------------------------------------------------
    def onSegment(self) -> None:
        """Check, then segment in the background; the result is added when the worker is done."""
        if self._task is not None:
            return
        if not ensureDependencies(self.parent):
            return
        if not self._entries:
            self._fillDevices()
            self.refreshModels()
        p = self._parameterNode
        device = self.ui.deviceComboBox.itemData(self.ui.deviceComboBox.currentIndex) or "auto"
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            entry = self._selectedEntry()
            if self.logic.isCine(p.inputVolume):
                sequence = p.inputVolume
                images = self.logic.cineImages(sequence)
                work = lambda progress, cancel: self.logic.predictCine(images, entry, device, progress, cancel)  # noqa: E731
                self._start(BackgroundTask(work), lambda task: self._finishCine(sequence, entry, task))
                return
            inputs = self.logic.prepareInputs(p.inputVolume, p.esVolume)
            work = lambda progress, cancel: self.logic.predict(inputs, entry, device, progress, cancel)  # noqa: E731
            self._start(BackgroundTask(work), lambda task: self._finishVolumes(inputs, task))

    def _start(self, task: BackgroundTask, done: Callable) -> None:
        self._task, self._taskDone = task, done
        self._setRunning(True)
        self._timer.start()

    def _setRunning(self, running: bool) -> None:
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running
        if running:
            self.ui.statusLabel.text = "Segmenting..."
        self._updateGui()

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        self.ui.progressBar.value = int(round(100 * task.fraction))
        if not task.done:
            return
        self._timer.stop()
        done, self._task, self._taskDone = self._taskDone, None, None
        self._setRunning(False)
        try:
            if task.error is not None:
                raise task.error
            done(task)
        except Exception as error:
            self._reportFailure(error)

    def _reportFailure(self, error: BaseException) -> None:
        from IDEALSegmentLib.cancel import Cancelled
        from IDEALTrain.errors import IdealError

        if isinstance(error, Cancelled):
            self._parameterNode.statusText = "Cancelled; the scene is unchanged."
            return
        self._parameterNode.statusText = f"Failed: {error}"
        if isinstance(error, IdealError):
            slicer.util.errorDisplay(str(error), windowTitle="IDEALSegment")
        else:
            logging.exception("IDEALSegment failed", exc_info=error)
            slicer.util.errorDisplay(f"Segmentation failed: {error}", windowTitle="IDEALSegment", detailedText=repr(error))

    def _finishVolumes(self, inputs, task: BackgroundTask) -> None:
        """Main thread: add the predictions to the scene, show them, measure an ED/ES pair."""
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            results, table = self.logic.addResults(inputs, task.result, withUncertainty=p.withUncertainty)
            first = results[0]
            p.segmentation = first.segmentation
            p.esSegmentation = results[1].segmentation if len(results) > 1 else None
            p.uncertaintyVolume = first.uncertainty
            p.reviewSlices = self.logic.reviewSlices(first.review)
            p.reviewPosition = 0
            if table is not None:
                p.measurementsTable = table
            p.statusText = first.summary() + (f"\nES: {results[1].summary()}" if len(results) > 1 else "")
        self.ui.deviceUsedLabel.text = f"Ran on {first.device}"
        self.logic.showSegmentation(inputs[0][0], first.segmentation)

    def _finishCine(self, sequence, entry, task: BackgroundTask) -> None:
        """Main thread: add the cine's segmentation sequence, browser sync and measurements, and show them."""
        result = self.logic.addCine(sequence, task.result)
        used = task.result[1][0].device
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.segmentation = result.browser.GetProxyNode(result.segmentation_sequence) if result.browser else None
            p.esSegmentation = None
            p.uncertaintyVolume = None
            p.reviewSlices = []
            p.measurementsTable = result.table
            p.statusText = (
                f"{sequence.GetName()}: {entry.model_id} {entry.version} on {used}, {len(result.frame_labels_ml)} frames in "
                f"{time.perf_counter() - task.started:.1f} s; ED frame {result.ed_index}, ES frame {result.es_index}"
            )
        self.ui.deviceUsedLabel.text = f"Ran on {used}"
        if result.browser is not None:
            volume = result.browser.GetProxyNode(sequence)
            if volume is not None and p.segmentation is not None:
                self.logic.showSegmentation(volume, p.segmentation)

    def onCancel(self) -> None:
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = "Cancelling..."
        if self._task is not None:
            self._task.cancel.cancel()

    # -- reviewing and correcting -----------------------------------------------------------------
    def onNextReviewSlice(self) -> None:
        """Jump the slice views to the next slice the decoders disagree on most."""
        p = self._parameterNode
        slices = list(p.reviewSlices)
        if not slices or not p.inputVolume:
            return
        position = p.reviewPosition % len(slices)
        index = slices[position]
        with slicer.util.tryWithErrorDisplay("Could not jump to the slice.", waitCursor=False):
            self.logic.jumpToSlice(p.inputVolume, index)
            p.reviewPosition = (position + 1) % len(slices)
            self.ui.reviewLabel.text = f"Slice {index}: {position + 1} of {len(slices)} to review"

    def onOpenSegmentEditor(self) -> None:
        p = self._parameterNode
        volume = self.logic.displayedVolume(p.inputVolume)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentation)
        if volume is not None:
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            setSource(volume)

    def onMarkReviewed(self) -> None:
        """Export the (corrected) segmentation and its image to the corrections data set."""
        p = self._parameterNode
        volume = self.logic.displayedVolume(p.inputVolume)
        folder = Path(self.ui.correctionsFolderPathLineEdit.currentPath or correctionsFolder())
        reviewer = self.ui.reviewerLineEdit.text.strip()
        with slicer.util.tryWithErrorDisplay("The case could not be added to the training set.", waitCursor=True):
            overwrite = False
            existing = self.logic.existingCorrection(folder, volume)
            if existing is not None:
                if not slicer.util.confirmYesNoDisplay(
                    f"{existing} is already in the training set. Replace it with this segmentation?", windowTitle="IDEALSegment"
                ):
                    return
                overwrite = True
            path = self.logic.exportCorrection(folder, volume, p.segmentation, reviewer, overwrite)
            p.statusText = f"Added to the training set: {path}"
            slicer.util.infoDisplay(
                f"The reviewed case was added to the training set:\n{path}\n\nTrain an updated model in the IDEALTrainer module.",
                windowTitle="IDEALSegment",
            )

    # -- measurements ---------------------------------------------------------------------------
    def onCopyMeasurements(self) -> None:
        text = self.logic.tableText(self._parameterNode.measurementsTable)
        qt.QApplication.clipboard().setText(text)
        self.ui.statusLabel.text = "Measurements copied (tab-separated; paste into a spreadsheet or report)."

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
            self.ui.statusLabel.text = f"Measurements saved to {path}"


#
# IDEALSegmentModuleLogic (Slicer's module logic; the package of the same name is IDEALSegmentLib)
#


class IDEALSegmentModuleLogic(ScriptedLoadableModuleLogic):
    """Thin, GUI-free layer over IDEALSegmentLib that the widget and scripts call.

    Named ...ModuleLogic so that it cannot be confused with the IDEALSegmentLib package.
    """

    def getParameterNode(self) -> IDEALSegmentParameterNode:
        return IDEALSegmentParameterNode(super().getParameterNode())

    # models and devices
    def registry(self):
        from IDEALSegmentLib.registry import ModelRegistry

        return ModelRegistry(user_dir=modelsFolder())

    def modelEntries(self) -> tuple:
        """(valid models, descriptions of unusable bundles)."""
        registry = self.registry()
        return registry.entries(), list(registry.problems)

    def currentEntry(self):
        """The model chosen in IDEALSegment (remembered per user), else the default; None when none is installed."""
        entries, _ = self.modelEntries()
        if not entries:
            return None
        key = settingsValue(MODEL_KEY)
        return next((e for e in entries if f"{e.model_id}@{e.version}" == key), None) or self.defaultEntry(entries)

    def defaultEntry(self, entries: list):
        from IDEALSegmentLib.registry import DEFAULT_MODEL_ID

        shipped = [e for e in entries if e.model_id == DEFAULT_MODEL_ID and e.source == "shipped"]
        return (shipped or entries)[0]

    # segmenting
    def isCine(self, node) -> bool:
        from IDEALSegmentLib.cine import is_cine

        return is_cine(node)

    def prepareInputs(self, volume, esVolume=None) -> list:
        """[(volume node, Image)] for the volume (and the ES volume); read on the main thread."""
        from IDEALTrain.errors import IdealError
        from IDEALSegmentLib.volumes import check_scalar_volume, image_from_volume

        volumes = [volume] + ([esVolume] if esVolume is not None else [])
        if esVolume is not None and esVolume is volume:
            raise IdealError("the end-systolic volume is the same as the input volume: choose the ES frame, or none")
        inputs = []
        for node in volumes:
            check_scalar_volume(node, allow_labelmap=False)
            inputs.append((node, image_from_volume(node, allow_labelmap=False)))
        return inputs

    def predict(self, inputs: list, entry, device: str, progress: Callable, cancel) -> tuple:
        """Worker thread: load the model and predict every input image; touches no scene."""
        from IDEALSegmentLib.inference import load_predictor, predict_volume

        predictor = load_predictor(entry, device)
        predictions = []
        for number, (_, image) in enumerate(inputs):
            share = lambda fraction, number=number: progress((number + fraction) / len(inputs))  # noqa: E731
            predictions.append(predict_volume(image, predictor, share, cancel))
        return predictor.bundle, predictions

    def addResults(self, inputs: list, predicted: tuple, withUncertainty: bool = True) -> tuple:
        """Main thread: a new segmentation per input, and for an ED/ES pair a measurements table.

        Everything is added or, on failure, everything this call added is removed again.
        """
        from IDEALSegmentLib.inference import add_prediction_to_scene, node_ids, remove_nodes_added_since
        from IDEALSegmentLib.measurements import measurements_from_segmentations, measurements_table

        bundle, predictions = predicted
        scene = inputs[0][0].GetScene()
        before = node_ids(scene)
        try:
            results = [
                add_prediction_to_scene(volume, prediction, bundle, with_uncertainty=withUncertainty and number == 0)
                for number, ((volume, _), prediction) in enumerate(zip(inputs, predictions))
            ]
            table = None
            if len(results) == 2:
                measured = measurements_from_segmentations(results[0].segmentation, inputs[0][0], results[1].segmentation, inputs[1][0])
                table = measurements_table(scene, measured, f"{inputs[0][0].GetName()} measurements")
        except BaseException:
            remove_nodes_added_since(scene, before)
            raise
        return results, table

    def cineImages(self, sequence) -> list:
        """Every frame of a cine as an Image (voxels and geometry); read on the main thread."""
        from IDEALSegmentLib.cine import frame_images

        return frame_images(sequence)

    def predictCine(self, images: list, entry, device: str, progress: Callable, cancel) -> tuple:
        """Worker thread: (bundle, predictions) for every cine frame; touches no scene."""
        from IDEALSegmentLib.cine import predict_sequence
        from IDEALSegmentLib.inference import load_predictor

        predictor = load_predictor(entry, device)
        return predictor.bundle, predict_sequence(images, predictor, progress, cancel)

    def addCine(self, sequence, predicted: tuple):
        """Main thread: the CineResult (segmentation sequence, browser, ED/ES, measurements table).

        Everything is added or, on failure, everything this call added is removed again.
        """
        from IDEALSegmentLib.cine import add_sequence_to_scene

        bundle, predictions = predicted
        return add_sequence_to_scene(sequence, predictions, bundle)

    def reviewSlices(self, review: list) -> list:
        """Slice indices to visit, most uncertain first: the flagged ones, else every slice with heart."""
        flagged = [r.slice_index for r in review if r.uncertain_voxels > 0]
        return flagged or [r.slice_index for r in review if r.heart_voxels > 0]

    # showing
    def showSegmentation(self, volume, segmentation) -> None:
        """Image in the slice views aligned to its own (oblique) slices, segments in 2D and 3D."""
        segmentation.CreateDefaultDisplayNodes()
        segmentation.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        for name in layoutManager.sliceViewNames():
            layoutManager.sliceWidget(name).mrmlSliceNode().RotateToVolumePlane(volume)
        slicer.util.resetSliceViews()
        if layoutManager.threeDViewCount:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def jumpToSlice(self, volume, sliceIndex: int) -> None:
        from IDEALSegmentLib.uncertainty import slice_center_ras

        r, a, s = slice_center_ras(volume, sliceIndex)
        slicer.vtkMRMLSliceNode.JumpAllSlices(volume.GetScene(), r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    def displayedVolume(self, node):
        """The scalar volume shown for ``node``: itself, or a cine's current frame (its browser's proxy)."""
        if node is None or not node.IsA("vtkMRMLSequenceNode"):
            return node
        for browser in slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode"):
            if browser.IsSynchronizedSequenceNode(node.GetID(), True):
                return browser.GetProxyNode(node)
        return None

    # corrections and measurements
    def existingCorrection(self, folder: Path, volume) -> Optional[Path]:
        """The label file a correction of ``volume`` would replace, None when it would be new."""
        from IDEALSegmentLib.corrections import SUFFIX, safe_case_id

        path = Path(folder) / "labels" / f"{safe_case_id(volume.GetName())}{SUFFIX}"
        return path if path.exists() else None

    def exportCorrection(self, folder: Path, volume, segmentation, reviewer: str, overwrite: bool = False) -> Path:
        from IDEALSegmentLib.corrections import export_correction

        return export_correction(folder, volume, segmentation, reviewer=reviewer, overwrite=overwrite)

    def tableText(self, table) -> str:
        """A table node as tab-separated text with a header row (for the clipboard)."""
        contents = table.GetTable()
        columns = range(contents.GetNumberOfColumns())
        lines = ["\t".join(contents.GetColumnName(c) for c in columns)]
        for row in range(contents.GetNumberOfRows()):
            lines.append("\t".join(contents.GetValue(row, c).ToString() for c in columns))
        return "\n".join(lines) + "\n"


#
# IDEALSegmentTest
#


class IDEALSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer's --testing mode: the self-test scenario through the Logic, then the widget."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scenario()
        self.setUp()
        self.test_widget_segments_in_background()

    def _workDir(self, name: str) -> Path:
        folder = Path(slicer.app.temporaryPath) / "IDEALSegmentTest" / f"{name}-{os.getpid()}-{int(time.time())}"
        folder.mkdir(parents=True)
        return folder

    def test_scenario(self):
        """Phantom -> segment -> check geometry and segment names -> export -> tiny training -> load the new model."""
        from IDEALSegmentLib.selftest import run_selftest_scenario

        self.delayDisplay("IDEALSegment self-test scenario")
        report = run_selftest_scenario(slicer.mrmlScene, self._workDir("scenario"), progress=self.delayDisplay, prefer_installed=True)
        self.assertEqual(report["segment_ids"], ["RV", "LV_Myocardium", "LV"])
        self.assertTrue(Path(report["correction"]).is_file())
        self.assertEqual(report["registered_source"], "user")
        self.delayDisplay("Scenario passed")

    def test_widget_segments_in_background(self):
        """The widget's Segment button, with a tiny model, adds a named segmentation without blocking."""
        from IDEALSegmentLib.selftest import make_selftest_model, selftest_phantom_volume

        self.assertTrue(ensureDependencies(), "the test needs PyTorch")
        work = self._workDir("widget")
        userModels = work / "models"
        make_selftest_model(userModels)
        slicer.util.selectModule("IDEALSegment")
        widget = slicer.modules.idealsegment.widgetRepresentation().self()
        previous = widget.ui.modelsFolderPathLineEdit.currentPath
        try:
            widget.ui.modelsFolderPathLineEdit.currentPath = str(userModels)
            widget.refreshModels()
            volume = selftest_phantom_volume(slicer.mrmlScene)
            widget._parameterNode.inputVolume = volume
            widget._parameterNode.esVolume = None
            widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findData("cpu")
            widget.onSegment()
            self.assertIsNotNone(widget._task, "Segment did not start a background task")
            deadline = time.time() + 120
            while widget._task is not None and time.time() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertIsNone(widget._task, "segmentation did not finish in 2 minutes")
            segmentation = widget._parameterNode.segmentation
            self.assertIsNotNone(segmentation, widget._parameterNode.statusText)
            ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(ids, ["RV", "LV_Myocardium", "LV"])
            self.assertIn("cpu", widget.ui.deviceUsedLabel.text)
        finally:
            widget.ui.modelsFolderPathLineEdit.currentPath = previous  # back to the user's folder (and setting)
        self.delayDisplay("Widget test passed")
