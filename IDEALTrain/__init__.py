"""IDEALTrain: data, networks, training, inference, metrics and model bundles for IDEALSegment.

Pure machine learning, no Slicer: importable in plain Python, on servers and inside Slicer.
"""
__version__ = "0.1.0"
