"""View changes of the IDEALSegment panel that need Slicer's application (layout, slice views)."""
import slicer


def showSegmentation(volume, segmentation) -> None:
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


def showUncertainty(volume, shown, uncertainty) -> None:
    """Overlay ``shown`` (the uncertainty volume, or None to remove ``uncertainty``) in the slice views."""
    compositeNodes = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    wanted = shown.GetID() if shown is not None else None
    if all(node.GetForegroundVolumeID() == wanted for node in compositeNodes):
        return
    if shown is not None:
        slicer.util.setSliceViewerLayers(background=volume or "keep-current", foreground=shown, foregroundOpacity=0.5)
    elif uncertainty is not None and any(node.GetForegroundVolumeID() == uncertainty.GetID() for node in compositeNodes):
        slicer.util.setSliceViewerLayers(foreground=None)
