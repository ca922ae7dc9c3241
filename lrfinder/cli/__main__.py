"""Run the command line as ``python -m lrfinder.cli``."""

from lrfinder.cli import main

main()
