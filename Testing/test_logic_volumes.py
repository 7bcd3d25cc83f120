"""Volume nodes <-> Image on real MRML (slicer-core): exact geometry, transforms, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

import vtk  # noqa: E402
from helpers import oblique_image  # noqa: E402
from IDEALSegmentLib.volumes import (  # noqa: E402
    array_to_matrix,
    image_from_volume,
    local_ijk_to_ras,
    volume_from_image,
)

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.image import Image  # noqa: E402


def linear_transform(scene, rotate=(17.0, -33.0), translate=(5.0, -7.0, 11.0), scale=None):
    transform = vtk.vtkTransform()
    transform.RotateX(rotate[0])
    transform.RotateZ(rotate[1])
    transform.Translate(*translate)
    if scale:
        transform.Scale(*scale)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def test_oblique_image_round_trip_is_exact():
    image = oblique_image()
    scene = slicer.vtkMRMLScene()
    node = volume_from_image(image, scene, "cine")
    back = image_from_volume(node)
    assert np.array_equal(back.array, image.array) and back.array.dtype == image.array.dtype
    assert back.spacing == image.spacing
    assert back.origin == image.origin
    assert np.array_equal(back.direction, image.direction)
    # MRML holds RAS: the first two rows of IJK-to-RAS are those of the LPS index-to-physical matrix, negated.
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.index_to_physical
    np.testing.assert_allclose(local_ijk_to_ras(node), expected, atol=1e-12)


def test_voxel_positions_match_simpleitk():
    image = oblique_image()
    node = volume_from_image(image, slicer.vtkMRMLScene(), "cine")
    sitk_image = image.to_sitk()
    for index in [(0, 0, 0), (47, 0, 0), (3, 39, 6), (47, 39, 6)]:
        lps = np.array(sitk_image.TransformIndexToPhysicalPoint(index))
        ras = local_ijk_to_ras(node) @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_new_nodes_get_unique_names_and_display():
    scene = slicer.vtkMRMLScene()
    first = volume_from_image(oblique_image(), scene, "cine")
    second = volume_from_image(oblique_image(), scene, "cine")
    assert first.GetName() == "cine" and second.GetName() != "cine"
    assert second.GetDisplayNode() is not None


def test_linear_parent_transform_gives_the_hardened_geometry():
    image = oblique_image()
    scene = slicer.vtkMRMLScene()
    node = volume_from_image(image, scene, "cine")
    transform = linear_transform(scene, scale=(1.5, 1.5, 1.5))
    node.SetAndObserveTransformNodeID(transform.GetID())
    seen = image_from_volume(node)

    hardened = volume_from_image(image, scene, "hardened")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    hardened.ApplyTransformMatrix(matrix)
    expected = image_from_volume(hardened)
    assert np.array_equal(seen.array, image.array)
    np.testing.assert_allclose(seen.spacing, expected.spacing, atol=1e-9)
    np.testing.assert_allclose(seen.spacing, np.array(image.spacing) * 1.5, atol=1e-9)
    np.testing.assert_allclose(seen.origin, expected.origin, atol=1e-9)
    np.testing.assert_allclose(seen.direction, expected.direction, atol=1e-9)


def test_volume_on_a_reference_grid_follows_its_transform():
    image = oblique_image()
    scene = slicer.vtkMRMLScene()
    source = volume_from_image(image, scene, "cine")
    source.SetAndObserveTransformNodeID(linear_transform(scene).GetID())
    world = image_from_volume(source)
    derived = volume_from_image(world.with_array(np.ones(image.array.shape, np.float32)), scene, "map", reference=source)
    assert derived.GetTransformNodeID() == source.GetTransformNodeID()
    np.testing.assert_array_equal(local_ijk_to_ras(derived), local_ijk_to_ras(source))
    with pytest.raises(IdealError, match="not on the voxel grid"):
        volume_from_image(image, scene, "map", reference=source)  # image holds the untransformed grid


def test_non_linear_transform_is_refused():
    scene = slicer.vtkMRMLScene()
    node = volume_from_image(oblique_image(), scene, "cine")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in [(0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100)]:
        source.InsertNextPoint(point)
        target.InsertNextPoint(np.array(point) + 3.0)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(IdealError, match="non-linear transform 'warp'.*harden"):
        image_from_volume(node)


def test_shearing_transform_is_refused():
    scene = slicer.vtkMRMLScene()
    node = volume_from_image(oblique_image(), scene, "cine")
    shear = np.eye(4)
    shear[0, 1] = 0.3
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(array_to_matrix(shear))
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(IdealError, match="shears"):
        image_from_volume(node)


def test_bad_volumes_give_clear_messages():
    scene = slicer.vtkMRMLScene()
    with pytest.raises(IdealError, match="no volume selected"):
        image_from_volume(None)
    with pytest.raises(IdealError, match="not a scalar volume"):
        image_from_volume(scene.AddNewNodeByClass("vtkMRMLModelNode"))
    with pytest.raises(IdealError, match="no voxel data"):
        image_from_volume(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 2)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    with pytest.raises(IdealError, match="colour/vector"):
        image_from_volume(rgb)
    labelmap = volume_from_image(Image(np.zeros((2, 4, 4), np.uint8)), scene, "labels", labelmap=True)
    assert image_from_volume(labelmap).array.shape == (2, 4, 4)
    with pytest.raises(IdealError, match="is a labelmap"):
        image_from_volume(labelmap, allow_labelmap=False)


def test_64_bit_integer_images_are_stored_as_32_bit():
    array = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)
    node = volume_from_image(Image(array), slicer.vtkMRMLScene(), "ints")
    back = image_from_volume(node)
    assert back.array.dtype == np.int32 and np.array_equal(back.array, array)


def test_geometry_survives_a_sitk_file_written_by_idealtrain(tmp_path):
    # IDEALTrain's file edge and the MRML edge agree on where every voxel is.
    from IDEALSegmentLib.scene_files import load_volume

    from IDEALTrain.io.volume_files import write_image

    image = oblique_image()
    path = write_image(image, tmp_path / "cine.nrrd")
    node = load_volume(slicer.vtkMRMLScene(), path)
    back = image_from_volume(node)
    assert np.array_equal(back.array, image.array)
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, image.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, image.direction, atol=1e-9)
    assert sitk.ReadImage(str(path)).GetSize() == image.size
