"""Image and volume I/O with geometry: files, DICOM, SSL4MIS, Sunnybrook, data specs, phantoms."""
