"""The `malmm` command line: Typer commands only.

Each command parses its options (declared once, in cli/options.py) and hands them to the
layer below (runs/ for the batch commands, learn/ for train and eval, engine/ for models and
doctor); nothing here knows how a video is read. `malmm --help` imports only this package and
the torch-free modules it names.
"""
