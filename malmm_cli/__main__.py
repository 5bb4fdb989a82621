"""`python -m malmm_cli` is the `malmm` command."""

from malmm_cli.cli.app import main

main()
