"""IDEALSegment in the browser: a trame-slicer front end over the same controllers as the Slicer panels."""
