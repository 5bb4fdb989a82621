"""`python -m malmm_cli` is the `malmm` command."""

from .app import main

main()
