"""Settings, the device list, the dependency check and the terminology file, shared by both IDEALSegment widgets."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import qt
import slicer
from IDEALSegmentLib import worker
from IDEALSegmentLib.devices import DeviceProbe
from IDEALSegmentLib.jobs import python_executable
from IDEALSegmentLib.registry import default_user_dir
from IDEALSegmentLib.slicer_support import unsupported_slicer

#: QSettings keys: choices that belong to the user, not to a scene.
MODELS_FOLDER_KEY = "IDEALSegment/ModelsFolder"
CORRECTIONS_FOLDER_KEY = "IDEALSegment/CorrectionsFolder"
TRAINING_FOLDER_KEY = "IDEALSegment/TrainingFolder"
DEVICE_KEY = "IDEALSegment/Device"
TRAINING_DEVICE_KEY = "IDEALSegment/TrainingDevice"
REVIEWER_KEY = "IDEALSegment/Reviewer"
MODEL_KEY = "IDEALSegment/LastModel"

#: Python packages the child processes need beyond what Slicer ships (torch comes through PyTorchUtils).
EXTRA_REQUIREMENTS = {"safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.2"
#: How often a widget polls its background job (ms).
POLL_MILLISECONDS = 200
#: The custom terminology list holding the LV myocardium (shipped under Resources/Terminology).
TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "Terminology" / "IDEALSegmentCardiac.term.json"

_probe: DeviceProbe | None = None


def settingsValue(key: str, default: str = "") -> str:
    """A per-user setting (QSettings), ``default`` when unset."""
    value = qt.QSettings().value(key)
    return str(value) if value not in (None, "") else default


def setSettingsValue(key: str, value: str) -> None:
    """Store a per-user setting."""
    qt.QSettings().setValue(key, value)


def modelsFolder() -> Path:
    """Where the user's own models are registered (QSettings, else the registry's default folder)."""
    return Path(settingsValue(MODELS_FOLDER_KEY, str(default_user_dir())))


def correctionsFolder() -> Path:
    """The corrections data set that "Mark reviewed" adds to and IDEALTrainer trains on."""
    return Path(settingsValue(CORRECTIONS_FOLDER_KEY, str(modelsFolder().parent / "Corrections")))


def trainingFolder() -> Path:
    """Where IDEALTrainer puts its run folders."""
    return Path(settingsValue(TRAINING_FOLDER_KEY, str(modelsFolder().parent / "Training")))


def deviceProbe() -> DeviceProbe:
    """The shared device probe (its cache sits beside the user's models folder)."""
    global _probe
    if _probe is None:
        _probe = DeviceProbe(default_user_dir().parent / "devices.json")
    return _probe


def fillDeviceComboBox(combo, settingsKey: str, cpuLabel: str = "CPU") -> None:
    """auto, CPU and each CUDA device by name (from the cached probe; a fresh probe refills it when done)."""
    probe = deviceProbe()
    devices = probe.cached()
    if devices is None and "torch" not in missingPackages():
        probe.start()
        qt.QTimer.singleShot(POLL_MILLISECONDS, lambda: _refillWhenProbed(combo, settingsKey, cpuLabel))
    wasBlocked = combo.blockSignals(True)
    combo.clear()
    combo.addItem("auto (GPU if available)", "auto")
    combo.addItem(cpuLabel, "cpu")
    for device, name in devices or []:
        combo.addItem(f"{device}: {name}", device)
    combo.currentIndex = max(combo.findData(settingsValue(settingsKey, "auto")), 0)
    combo.blockSignals(wasBlocked)


def _refillWhenProbed(combo, settingsKey: str, cpuLabel: str) -> None:
    if deviceProbe().running:
        qt.QTimer.singleShot(POLL_MILLISECONDS, lambda: _refillWhenProbed(combo, settingsKey, cpuLabel))
        return
    if deviceProbe().poll() is not None:
        fillDeviceComboBox(combo, settingsKey, cpuLabel)


def comboData(combo, default: str = "auto") -> str:
    """The data of a combo box's current item."""
    return combo.itemData(combo.currentIndex) or default


def missingPackages() -> list:
    """Names of the Python packages the child processes need that are not installed (nothing is imported)."""
    return [name for name in ("torch", *EXTRA_REQUIREMENTS) if importlib.util.find_spec(name) is None]


def ensureDependencies(parent=None, onInstalled=None) -> bool:
    """Install torch (as the PyTorch extension does, when it is there) and the small extras after asking; True when ready.

    Called on the first Segment / Train click, never at import or module load, and never in
    ``--testing`` mode (the self-tests skip instead). Slicer's own numpy and SimpleITK are left alone.
    ``onInstalled`` runs after a successful installation (the widgets refill their device lists).
    """
    missing = missingPackages()
    if not missing:
        return True
    if slicer.app.testingEnabled():
        logging.warning("IDEALSegment: not installing %s in testing mode", ", ".join(missing))
        return False
    torchUtils = None
    if "torch" in missing:
        try:
            import PyTorchUtils  # only to know the PyTorch extension is there: see installTorchLikePyTorchUtils

            torchUtils = PyTorchUtils.PyTorchUtilsLogic
        except ImportError:
            torchUtils = None
    extras = [name for name in missing if name != "torch"]
    how = ""
    if "torch" in missing:
        how = (
            "PyTorch will be installed by the PyTorch extension, which picks the build that matches your GPU.\n"
            if torchUtils is not None
            else "PyTorch will be installed with pip (this can download more than 2 GB; the PyTorch extension from the "
            "Extensions Manager picks a GPU-matched build and is the better choice).\n"
        )
    text = (
        "IDEALSegment runs its neural network with PyTorch (in a separate process) and needs these Python packages "
        f"that are not installed yet: {', '.join(missing)}.\n\n{how}"
        + (f"Also installed with pip: {', '.join(EXTRA_REQUIREMENTS[name] for name in extras)}.\n" if extras else "")
        + "\nInstall now? This takes a few minutes; Slicer's own packages are not changed."
    )
    if not slicer.util.confirmOkCancelDisplay(text, windowTitle="IDEALSegment: install PyTorch", parent=parent):
        return False
    with slicer.util.tryWithErrorDisplay("Installing the packages failed; see the Python console for pip's message.", waitCursor=True):
        if "torch" in missing:
            if torchUtils is not None:
                installTorchLikePyTorchUtils()
            else:
                slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")
        if extras:
            slicer.util.pip_install(" ".join(EXTRA_REQUIREMENTS[name] for name in extras))
        importlib.invalidate_caches()
    still = missingPackages()
    if still:
        slicer.util.errorDisplay(f"Still missing after the installation: {', '.join(still)}. Restart Slicer and try again.")
        return False
    if onInstalled is not None:
        onInstalled()
    return True


def installTorchLikePyTorchUtils() -> None:
    """Install the torch build that matches the GPU with light-the-torch, as the PyTorch extension does, in a child.

    Not ``PyTorchUtilsLogic.installTorch``: it ends with ``import torch`` in Slicer's process (seconds, and
    torch's libraries loaded for good), which the extension avoids everywhere; the network runs in children.
    """
    if importlib.util.find_spec("light_the_torch") is None:
        slicer.util.pip_install("light-the-torch>=0.5")
    command = [str(python_executable()), "-m", "light_the_torch", "install", f"torch{TORCH_REQUIREMENT}"]
    slicer.util.logProcessOutput(slicer.util.launchConsoleProcess(command, useStartupEnvironment=False))


def unsupportedSlicer(module: str) -> str | None:
    """The line ``module`` shows instead of its panel on a Slicer older than it supports, else None."""
    return unsupported_slicer(module, (slicer.app.majorVersion, slicer.app.minorVersion))


def selfTestSkipReason(module: str) -> str | None:
    """Why ``module``'s self-test cannot run here (an unsupported Slicer, or torch not installed), else None."""
    problem = unsupportedSlicer(module)
    if problem:
        return problem
    missing = missingPackages()
    if missing:  # never installed in testing mode
        return f"{module} self-test skipped: Python package(s) {', '.join(missing)} not installed"
    return None


def showUnsupported(layout, text: str) -> None:
    """The whole panel on an unsupported Slicer: one line saying which Slicer the module needs."""
    label = qt.QLabel(text)
    label.wordWrap = True
    layout.addWidget(label)
    layout.addStretch(1)


def stopWorkers() -> None:
    """Stop the idle warm workers (a widget's cleanup: Slicer exits or the module is reloaded)."""
    worker.shutdown()


def loadTerminology() -> None:
    """Load the custom terminology list (LV myocardium) into Slicer's Terminologies module, once; no-op without it."""
    terminologies = getattr(slicer.modules, "terminologies", None)
    if terminologies is None:
        return
    logic = terminologies.logic()
    if not logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE)):
        logging.warning("IDEALSegment: could not load the terminology file %s", TERMINOLOGY_FILE)
