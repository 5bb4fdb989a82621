"""malmm: the command line, the engine and the long-video loop around the MA-LMM network
(``models``), in packages with one job each: cli, learn, runs, engine, results, sources
(README, "Layout"; tests/test_layout.py keeps their imports pointing one way)."""

__version__ = "0.1.0"
