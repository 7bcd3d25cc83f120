"""*Sample Data > Cardiac MRI (IDEALSegment)*: the shipped real cine MRI, offered once Slicer has started.

What to load and how is decided in IDEALSegmentLib.sample_data; this only hands it to Slicer's
Sample Data module (its button calls :func:`loadSample`) and shows the loaded end-diastole.
"""
import logging

import slicer


def registerSampleData() -> None:
    """Add the sample to Sample Data; without Sample Data or the sample files it logs why and does nothing."""
    try:
        import SampleData
        from IDEALSegmentLib.sample_data import sample_data_source

        from IDEALTrain.errors import IdealError
    except ImportError as error:
        logging.warning("IDEALSegment: the sample is not offered in Sample Data (%s)", error)
        return
    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**sample_data_source(), customDownloader=loadSample)
    except IdealError as error:
        logging.warning("IDEALSegment: the sample is not offered in Sample Data: %s", error)


def loadSample(source=None) -> list:
    """Sample Data's button: add the sample's ED and ES volumes to the scene and show end-diastole."""
    from IDEALSegmentLib.sample_data import load_sample_volumes

    with slicer.util.tryWithErrorDisplay("Could not load the IDEALSegment sample.", waitCursor=True):
        nodes = load_sample_volumes(slicer.mrmlScene)
        slicer.util.setSliceViewerLayers(background=nodes["ED"], fit=True)
        return list(nodes.values())
    return []
