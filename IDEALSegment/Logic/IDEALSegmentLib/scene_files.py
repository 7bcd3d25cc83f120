"""Volumes and segmentations from files, and whole scenes (.mrb) to and from files, through MRML storage nodes.

Works the same in Slicer and on slicer-core (which needs a cache and a data-IO manager on a scene
to read a .mrb: :func:`load_scene_bundle` attaches them). Scenes are written atomically and an
existing file is never replaced unless the caller says ``overwrite``. A ``.seg.nrrd`` file has one
writer, ``IDEALTrain.io.volume_files.write_image`` (Testing/test_seg_nrrd_writer.py shows Slicer
reads its file exactly as its own storage node's).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import slicer

from IDEALTrain.errors import IdealError
from IDEALTrain.io.atomic import check_outputs, file_mode, os_error_message
from IDEALTrain.io.output_guard import temp_prefix
from IDEALTrain.io.volume_files import strip_volume_suffix

from .volumes import unique_node_name


def _check_target(path: Path, overwrite: bool) -> Path:
    """The absolute target (MRML writers refuse relative folders), checked as every output is."""
    if not path.parent.is_dir():
        raise IdealError(f"{path.parent}: no such folder")
    return check_outputs([path], overwrite, hint="choose another name or allow overwriting")[0]


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A path with ``path``'s exact name in a hidden folder beside it, moved onto ``path`` on success.

    The same name matters: a .mrb names its scene folder and .mrml file after the file.
    """
    try:
        folder = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    try:
        yield folder / path.name
        written = folder / path.name
        if not written.is_file() or written.stat().st_size == 0:
            raise IdealError(f"{path}: the write produced no file or an empty one (disk full?); nothing was replaced")
        os.chmod(written, file_mode())
        os.replace(written, path)
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load(scene: object, path: str | Path, node_class: str, storage_class: str, name: str | None) -> object:
    """A new node of ``node_class`` read from ``path``, with its storage node in the scene."""
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"{path}: no such file")
    node = scene.AddNewNodeByClass(node_class, unique_node_name(scene, name or strip_volume_suffix(path.name)))
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise IdealError(f"{path}: could not be read as a {node_class.removeprefix('vtkMRML').removesuffix('Node')}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def load_volume(scene: object, path: str | Path, name: str | None = None) -> object:
    """A new scalar volume node read from a 3D image file (NRRD, NIfTI, MHA)."""
    return _load(scene, path, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", name)


def load_segmentation(scene: object, path: str | Path, name: str | None = None) -> object:
    """A new segmentation node read from a ``.seg.nrrd`` file (segment IDs, names, tags kept)."""
    from .segmentations import register_converter_rules

    register_converter_rules()
    return _load(scene, path, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", name)


def save_scene_bundle(scene: object, path: str | Path, overwrite: bool = False) -> Path:
    """Write the whole scene as a Slicer scene bundle (.mrb), atomically.

    Storable nodes without a storage node get a default one (as Slicer's Save dialog does).
    """
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise IdealError(f"{path}: a scene bundle must end in .mrb")
    path = _check_target(path, overwrite)
    nodes = scene.GetNodesByClass("vtkMRMLStorableNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetStorageNode() is None and node.GetSaveWithScene():
            node.AddDefaultStorageNode()
    messages = slicer.vtkMRMLMessageCollection()
    with _atomic(path) as partial:
        if not scene.WriteToMRB(str(partial), None, messages):
            raise IdealError(f"{path}: could not write the scene bundle: {_text(messages)}")
    return path


def register_sequence_browser_class(scene: object) -> bool:
    """Let ``scene`` hold sequence browser nodes (plain slicer-core does not register the class,
    Slicer's Sequences module does); False when this Slicer has no Sequences support at all."""
    if not hasattr(slicer, "vtkMRMLSequenceBrowserNode"):
        return False
    if not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    return True


def load_scene_bundle(path: str | Path) -> object:
    """A NEW scene read from a .mrb file (with the cache and data-IO managers reading needs)."""
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"{path}: no such file")
    from .segmentations import register_converter_rules

    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    register_sequence_browser_class(scene)  # cine results hold a browser
    messages = slicer.vtkMRMLMessageCollection()
    with tempfile.TemporaryDirectory(prefix="idealsegment-mrb-") as cache:
        cache_manager = slicer.vtkCacheManager()
        cache_manager.SetRemoteCacheDirectory(cache)
        scene.SetCacheManager(cache_manager)
        data_io = slicer.vtkDataIOManager()
        data_io.SetCacheManager(cache_manager)
        scene.SetDataIOManager(data_io)
        if not scene.ReadFromMRB(str(path), True, messages):
            raise IdealError(f"{path}: could not read the scene bundle: {_text(messages)}")
    return scene


def _text(messages: object) -> str:
    texts = [messages.GetNthMessageText(index) for index in range(messages.GetNumberOfMessages())]
    return "; ".join(text for text in texts if text) or "no details"
