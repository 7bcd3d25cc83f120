"""``python -m IDEALTrain`` runs the ``idealtrain`` command line."""
import sys

from .cli import main

sys.exit(main())
