"""The Slicer modules' .ui files are valid Qt Designer XML that matches the module code.

There is no Slicer application here, so this is where widget wiring is checked: every ``ui.NAME``
the module code uses exists in its .ui file, every widget bound to the parameter node
(``SlicerParameterName``) names a parameter of the right type, and Designer's own references
(custom widget classes, connections) resolve.
"""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"
MODULES = ("IDEALSegment", "IDEALTrainer")

# Parameter types -> widget classes the parameterNodeWrapper can bind them to. Not QLabel: Slicer 5.6's wrapper has
# no QLabel connector (setParameterNode raises and the panel never enables), so a status label is set in code.
BINDABLE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


def ui_widgets(ui_path: Path) -> dict[str, ElementTree.Element]:
    """Every named widget of a .ui file (name -> element); duplicate names are an error."""
    root = ElementTree.parse(ui_path).getroot()
    widgets: dict[str, ElementTree.Element] = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name, f"{ui_path.name}: a <widget class={element.get('class')!r}> has no name"
        assert name not in widgets, f"{ui_path.name}: widget name {name!r} is used twice"
        widgets[name] = element
    return widgets


def ui_accesses(source: str) -> dict[str, int]:
    """Names NAME of every ``<something>.ui.NAME`` in module code, with the first line using each."""
    names: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.setdefault(node.attr, node.lineno)
    return names


def missing_widgets(source: str, widgets: dict) -> list[str]:
    """``ui.NAME`` uses whose NAME is not a widget of the .ui file, as 'NAME (line N)'."""
    return [f"{name} (line {line})" for name, line in sorted(ui_accesses(source).items()) if name not in widgets]


def loaded_ui_file(source: str) -> str:
    """The ``UI/<file>.ui`` that the widget's setup loads (``loadUI(self.resourcePath("UI/..."))``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "resourcePath":
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and str(argument.value).startswith("UI/"):
                return argument.value
    raise AssertionError("the module never loads a UI/... file with resourcePath")


def parameter_types(source: str) -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> one of BINDABLE's kinds (or 'list', 'other')."""
    tree = ast.parse(source)
    enums = _enum_names(tree)
    for node in tree.body:  # enums the module imports from its Logic package (e.g. the trainer controller's EncoderStart)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("IDEALSegmentLib."):
            logic = (MODULE_DIR / "Logic").joinpath(*node.module.split(".")).with_suffix(".py")
            enums |= _enum_names(ast.parse(logic.read_text())) & {alias.name for alias in node.names}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    fields[item.target.id] = _kind(item.annotation, enums)
            return fields
    raise AssertionError("no @parameterNodeWrapper class in the module")


def _enum_names(tree: ast.Module) -> set[str]:
    return {
        node.name for node in tree.body
        if isinstance(node, ast.ClassDef) and any(getattr(base, "attr", getattr(base, "id", "")) == "Enum" for base in node.bases)
    }


def _kind(annotation: ast.expr, enums: set[str]) -> str:
    text = ast.unparse(annotation)
    if text.startswith("Annotated["):
        return _kind(annotation.slice.elts[0], enums)  # type: ignore[attr-defined]
    if text.startswith(("Union[", "Optional[")):
        kinds = {_kind(e, enums) for e in (annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice])}  # type: ignore[attr-defined]
        return kinds.pop() if len(kinds) == 1 else "other"
    if text.startswith("vtkMRML"):
        return "node"
    if text in enums:
        return "enum"
    if text.startswith("list["):
        return "list"
    return text if text in BINDABLE else "other"


def bound_widgets(widgets: dict) -> dict[str, tuple[str, str, ElementTree.Element]]:
    """Widgets with a SlicerParameterName: widget name -> (parameter, widget class, element)."""
    bound = {}
    for name, element in widgets.items():
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = (prop.findtext("string"), element.get("class"), element)
    return bound


def _module_source(module: str) -> str:
    return (MODULE_DIR / f"{module}.py").read_text(encoding="utf-8")


def _module_ui(module: str) -> Path:
    return MODULE_DIR / "Resources" / loaded_ui_file(_module_source(module))


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_is_designer_xml(module):
    ui_path = _module_ui(module)
    assert ui_path.name == f"{module}.ui"
    root = ElementTree.parse(ui_path).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0", "not a Qt Designer file"
    assert root.findtext("class") == module
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == module
    widgets = ui_widgets(ui_path)
    custom = {c.findtext("class"): c for c in root.iter("customwidget")}
    for name, element in widgets.items():
        cls = element.get("class")
        assert cls.startswith("Q") or cls in custom, f"{name}: class {cls} is not a Qt class and not declared in <customwidgets>"
    for cls, declaration in custom.items():
        assert declaration.findtext("extends") and declaration.findtext("header") == f"{cls}.h", f"<customwidget> {cls} is incomplete"
    for connection in root.iter("connection"):
        for end in ("sender", "receiver"):
            assert connection.findtext(end) in widgets, f"connection {end} {connection.findtext(end)!r} is not a widget"


@pytest.mark.parametrize("module", MODULES)
def test_module_code_uses_only_widgets_of_its_ui_file(module):
    source = _module_source(module)
    assert ui_accesses(source), "the parser found no ui.NAME uses: the check would pass vacuously"
    assert missing_widgets(source, ui_widgets(_module_ui(module))) == []


@pytest.mark.parametrize("module", MODULES)
def test_bound_widgets_match_parameter_names_and_types(module):
    widgets = ui_widgets(_module_ui(module))
    fields = parameter_types(_module_source(module))
    bound = bound_widgets(widgets)
    assert bound, "no widget is bound to the parameter node"
    for name, (parameter, cls, element) in bound.items():
        assert parameter in fields, f"{name} is bound to {parameter!r}, which the parameter node does not have ({sorted(fields)})"
        kind = fields[parameter]
        assert cls in BINDABLE.get(kind, ()), f"{name} ({cls}) cannot show parameter {parameter} of kind {kind}"
        if cls == "QPushButton":
            checkable = {p.get("name"): p.findtext("bool") for p in element.findall("property")}.get("checkable")
            assert checkable == "true", f"{name} is bound to a bool and must be checkable"
    assert len({parameter for parameter, _, _ in bound.values()}) == len(bound), "two widgets bound to one parameter"


@pytest.mark.parametrize("module", MODULES)
def test_mrml_widgets_receive_the_scene(module):
    """qMRML widgets get the scene through Designer connections from the top-level qMRMLWidget."""
    ui_path = _module_ui(module)
    root = ElementTree.parse(ui_path).getroot()
    widgets = ui_widgets(ui_path)
    connected = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("sender") == module and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    needing = {name for name, element in widgets.items() if element.get("class").startswith("qMRML") and name != module}
    assert needing and needing <= connected, f"not given the scene: {sorted(needing - connected)}"


def test_the_checks_catch_a_mismatch(tmp_path):
    """The parsers report a widget the code uses but the .ui lacks, and a bad binding."""
    ui = tmp_path / "Demo.ui"
    ui.write_text(
        '<?xml version="1.0"?><ui version="4.0"><class>Demo</class><widget class="qMRMLWidget" name="Demo">'
        '<widget class="QPushButton" name="applyButton"/>'
        '<widget class="QSpinBox" name="countSpinBox"><property name="SlicerParameterName" stdset="0">'
        "<string>label</string></property></widget></widget></ui>"
    )
    source = "class W:\n    def f(self):\n        self.ui.applyButton.enabled = True\n        self.ui.aplyButton.text = 'x'\n"
    assert missing_widgets(source, ui_widgets(ui)) == ["aplyButton (line 4)"]
    fields = parameter_types("@parameterNodeWrapper\nclass P:\n    label: str = ''\n    count: Annotated[int, WithinRange(0, 9)] = 1\n")
    assert fields == {"label": "str", "count": "int"}
    parameter, cls, _ = bound_widgets(ui_widgets(ui))["countSpinBox"]
    assert cls not in BINDABLE[fields[parameter]], "a QSpinBox bound to a str must be reported"


def test_the_refine_section_sits_after_the_review_section_above_the_closing_spacer():
    """refine.py inserts its section after ANCHOR in the .ui's main layout (appended to the module's layout it
    landed below the collapsed Settings and the spacer). Where it really shows needs a Slicer GUI."""
    tree = ast.parse((MODULE_DIR / "IDEALSegmentGui" / "refine.py").read_text())
    anchor = next(node.value.value for node in tree.body if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "ANCHOR")
    assert "insertWidget" in ast.unparse(tree) and "addWidget(box)" not in ast.unparse(tree)
    main = ElementTree.parse(_module_ui("IDEALSegment")).getroot().find("widget/layout")
    items = [(child.tag, child.get("name"), child.get("class")) for item in main.findall("item") for child in item]
    names = [name for _, name, _ in items]
    assert anchor in names, f"{anchor} is not a top-level item of IDEALSegment.ui's main layout"
    spacer = next(i for i, (tag, _, _) in enumerate(items) if tag == "spacer")
    assert names.index(anchor) < names.index("settingsCollapsibleButton") < spacer
