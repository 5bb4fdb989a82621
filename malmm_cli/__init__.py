"""malmm: the command line and long-video loop around the MA-LMM model (``models``)."""

__version__ = "0.1.0"
