"""``python -m slimdeploy`` runs the command line."""

from slimdeploy.cli import main

main()
