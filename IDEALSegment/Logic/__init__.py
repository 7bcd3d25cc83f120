"""IDEALSegment's Slicer-facing logic: MRML nodes <-> IDEALTrain, with no Qt and no slicer.app.

Empty until the Logic layer lands; it will import IDEALTrain, never the other way round.
"""
