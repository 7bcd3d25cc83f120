"""IDEALSegmentLib: MRML nodes <-> IDEALTrain with exact geometry; no Qt, no slicer.app.

Imported as ``IDEALSegmentLib`` everywhere (see README.md here); submodules are imported
explicitly (``from IDEALSegmentLib.volumes import image_from_volume``) so that importing the
package itself stays cheap and does not need Slicer.
"""
