"""Qt helpers shared by the IDEALSegment and IDEALTrainer widgets (settings, device list, dependencies, terminology).

A sub-folder package, so Slicer does not load it as a module; it may use qt and slicer.app, which
IDEALSegmentLib never does.
"""
