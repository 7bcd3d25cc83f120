"""Installing torch from the panel (IDEALSegmentGui.common.ensureDependencies), with Slicer's calls recorded.

With the PyTorch extension present, torch is installed with light-the-torch in a child process, as
PyTorchUtils does, but never through ``PyTorchUtilsLogic.installTorch``, which ends with ``import torch``
in Slicer's process. After a successful installation the widget's callback refills the device list.
Slicer's application is absent here: ``qt``, ``slicer`` and ``PyTorchUtils`` are stand-ins that record
calls; the code under test is the real common.py.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _PyTorchUtilsLogic:
    def installTorch(self, *args, **kwargs):
        raise AssertionError("PyTorchUtilsLogic.installTorch imports torch in Slicer's process")


@pytest.fixture
def common(monkeypatch):
    calls: list = []
    util = types.SimpleNamespace(
        confirmOkCancelDisplay=lambda text, **kwargs: calls.append(("confirm", text)) or True,
        pip_install=lambda requirements: calls.append(("pip", requirements)),
        launchConsoleProcess=lambda command, **kwargs: calls.append(("launch", command)) or "process",
        logProcessOutput=lambda process: calls.append(("wait", process)),
        tryWithErrorDisplay=lambda *args, **kwargs: contextlib.nullcontext(),
        errorDisplay=lambda text, **kwargs: calls.append(("error", text)),
    )
    slicer = types.SimpleNamespace(util=util, app=types.SimpleNamespace(testingEnabled=lambda: False))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=_PyTorchUtilsLogic))
    spec = importlib.util.spec_from_file_location("idealsegment_gui_common", ROOT / "IDEALSegment" / "IDEALSegmentGui" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, calls


def test_torch_is_installed_like_pytorchutils_but_in_a_child_and_the_devices_refilled(common, monkeypatch):
    module, calls = common
    missing = [["torch"], []]  # before and after the installation
    monkeypatch.setattr(module, "missingPackages", lambda: missing.pop(0) if len(missing) > 1 else missing[0])
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None if name == "light_the_torch" else object())
    refilled = []
    assert module.ensureDependencies(onInstalled=lambda: refilled.append(True)) is True
    kinds = [kind for kind, _ in calls]
    assert kinds == ["confirm", "pip", "launch", "wait"], calls
    assert calls[1][1] == "light-the-torch>=0.5"
    command = calls[2][1]
    assert command[1:] == ["-m", "light_the_torch", "install", f"torch{module.TORCH_REQUIREMENT}"]
    assert command[0] == str(module.python_executable())  # PythonSlicer inside Slicer
    assert refilled == [True]  # the device list is filled again: the probe now finds the GPUs


def test_nothing_is_installed_or_refilled_when_the_user_declines(common, monkeypatch):
    module, calls = common
    monkeypatch.setattr(module, "missingPackages", lambda: ["torch"])
    monkeypatch.setattr(module.slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: False)
    refilled = []
    assert module.ensureDependencies(onInstalled=lambda: refilled.append(True)) is False
    assert calls == [] and refilled == []
