"""Every node-typed field of a ``@parameterNodeWrapper`` class admits None, as Slicer's wrapper requires.

Slicer writes each field's default when it first wraps a parameter node. For a node type that
default is None; ``IsInstance`` lets None through for a plain node type, but a ``Union`` of node
types picks a serializer by the value's type and raises ``TypeError: Unable to write value 'None'``
unless None is one of its members (``UnionSerializer._findBestSerializer`` in
Base/Python/slicer/parameterNodeWrapper/serializers.py). The module files import qt and slicer,
which are absent here, so the rule is checked on their source through ``ast``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "IDEALSegment"
MODULE_FILES = ("IDEALSegment.py", "IDEALTrainer.py")


def _name(node: ast.expr) -> str:
    """``vtkMRMLScalarVolumeNode`` for ``vtkMRMLScalarVolumeNode`` and ``slicer.vtkMRMLScalarVolumeNode``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant):
        return repr(node.value)
    return ""


def _members(annotation: ast.expr) -> tuple[list[ast.expr], bool]:
    """(the types an annotation allows, whether it is a union); Annotated and Optional unwrapped."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):  # A | B (PEP 604)
        left, _ = _members(annotation.left)
        right, _ = _members(annotation.right)
        return left + right, True
    if isinstance(annotation, ast.Subscript):
        outer = _name(annotation.value)
        inner = annotation.slice
        items = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        if outer == "Annotated":
            return _members(items[0])
        if outer == "Optional":
            return [*items, ast.Constant(None)], True
        if outer == "Union":
            members = []
            for item in items:
                members += _members(item)[0]
            return members, True
    return [annotation], False


def node_field_problems(source: str, filename: str = "<module>") -> list[str]:
    """Fields of @parameterNodeWrapper classes in ``source`` whose default None Slicer could not write."""
    problems = []
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef) or "parameterNodeWrapper" not in {_name(d) for d in cls.decorator_list}:
            continue
        for statement in cls.body:
            if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
                continue
            members, is_union = _members(statement.annotation)
            names = [_name(m) for m in members]
            has_node = any(n.startswith("vtkMRML") for n in names)
            admits_none = any(n in ("None", "NoneType") for n in names)
            if has_node and is_union and not admits_none:
                problems.append(f"{filename}: {cls.name}.{statement.target.id}: a Union of node types must include None")
    return problems


@pytest.mark.parametrize("filename", MODULE_FILES)
def test_module_parameter_node_fields_admit_none(filename):
    source = (MODULE_DIR / filename).read_text()
    assert "@parameterNodeWrapper" in source
    assert node_field_problems(source, filename) == []


@pytest.mark.parametrize(
    ("annotation", "ok"),
    [
        ("Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]", False),  # what kept the panel from opening
        ("vtkMRMLScalarVolumeNode | slicer.vtkMRMLSequenceNode", False),
        ("Annotated[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode], Default(None)]", False),
        ("Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]", True),
        ("Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode, None]", True),
        ("vtkMRMLScalarVolumeNode | vtkMRMLSequenceNode | None", True),
        ("vtkMRMLScalarVolumeNode", True),  # IsInstance accepts None for a plain node type
        ("Optional[vtkMRMLScalarVolumeNode]", True),
        ("Union[int, str]", True),  # no node type: the first member's default is written
    ],
)
def test_the_rule_as_slicer_states_it(annotation, ok):
    source = f"@parameterNodeWrapper\nclass P:\n    field: {annotation}\n"
    assert (node_field_problems(source) == []) is ok
