"""Import both module files as Slicer does, start each module and open its panel on Slicer 5.8 and on 5.10, and
close a widget (cleanup: Slicer exits or Reload). Not a pytest file: Testing/test_python39.py runs it with a
Python 3.9 (what Slicer 5.6/5.8 embed), where one is installed, and with the test's own Python.

Slicer's own libraries (slicer, qt, ctk, vtk, numpy, SimpleITK, safetensors) are not installed for 3.9 here, so
an import hook hands out placeholders for them: any attribute is a class, so module-level code runs, and
``Placeholder | None`` raises TypeError as a real class does on 3.9. Every file of this repository that the
modules import at start-up runs for real. Prints one JSON line: what each module did on each Slicer version.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"
PROVIDED_BY_SLICER = {"slicer", "qt", "ctk", "vtk", "numpy", "SimpleITK", "safetensors", "SampleData", "PyTorchUtils"}


class _PlaceholderType(type):
    """Any attribute of a placeholder class is another placeholder class (no ``__or__``: ``X | None`` fails on 3.9)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(name)


class _Placeholder(metaclass=_PlaceholderType):
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(name)()

    def __call__(self, *args, **kwargs):
        return _Placeholder()


def placeholder(name: str) -> type:
    return _PlaceholderType(name, (_Placeholder,), {})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = placeholder(name)
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in PROVIDED_BY_SLICER:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())

# The few Slicer names whose behaviour the check looks at.
import qt  # noqa: E402
import slicer  # noqa: E402  (a placeholder module)
import slicer.parameterNodeWrapper  # noqa: E402
import slicer.ScriptedLoadableModule as scripted  # noqa: E402


class _App:
    majorVersion, minorVersion = 5, 8
    connections: list = []

    @classmethod
    def connect(cls, signal, slot):
        cls.connections.append(signal)


class _ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _Widget:
    def __init__(self, parent=None):
        self.parent = parent
        self.layout = _Layout()

    def setup(self):
        pass


class _Layout:
    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)

    def addStretch(self, stretch=0):
        pass


class _QLabel:
    def __init__(self, text=""):
        self.text = text


slicer.app = _App
slicer.parameterNodeWrapper.parameterNodeWrapper = lambda cls: cls
scripted.ScriptedLoadableModule = _ScriptedLoadableModule
scripted.ScriptedLoadableModuleWidget = _Widget
qt.QLabel = _QLabel


def load_module_file(name: str):
    """What Slicer does with a scripted module file: register it in sys.modules, then run it."""
    spec = importlib.util.spec_from_file_location(name, MODULE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Recorder:
    """Records every method called on it as 'name.method'."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getattr__(self, method):
        return lambda *args, **kwargs: self.calls.append(f"{self.name}.{method}")


def cleanup_calls(module, name):
    """What the widget's cleanup() stops, on a widget whose parts are recorders."""
    calls = []
    widget = getattr(module, f"{name}Widget")(types.SimpleNamespace())
    for attribute in ("panel", "refineSection", "_timer", "_folderTimer"):
        if attribute in vars(widget):
            setattr(widget, attribute, _Recorder(attribute, calls))
    widget.removeObservers = lambda: calls.append("removeObservers")
    module.common.worker.shutdown = lambda: calls.append("worker.shutdown")
    widget.cleanup()
    return calls


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    sys.path.insert(0, str(MODULE_DIR))  # Slicer puts the module folder on sys.path
    log = _Log()
    logging.getLogger().addHandler(log)
    report = {"python": list(sys.version_info[:2]), "cleanup": {}}
    for name in ("IDEALSegment", "IDEALTrainer"):
        module = load_module_file(name)
        for version in ((5, 8), (5, 10)):
            _App.majorVersion, _App.minorVersion = version
            _App.connections, log.lines = [], []
            parent = types.SimpleNamespace()
            getattr(module, name)(parent)
            seen = {"warnings": log.lines, "helpText": parent.helpText.strip(), "connections": _App.connections}
            if version == (5, 8):  # opening the panel: one line, nothing else built
                widget = getattr(module, f"{name}Widget")(parent)
                widget.setup()
                seen["panel"] = [w.text for w in widget.layout.widgets if isinstance(w, _QLabel)]
                seen["panelBuilt"] = "ui" in vars(widget)
                widget.enter()
                widget.cleanup()
            report[f"{name} {version[0]}.{version[1]}"] = seen
        report["cleanup"][name] = cleanup_calls(module, name)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
