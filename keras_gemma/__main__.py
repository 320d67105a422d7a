"""`python -m keras_gemma ...` runs the `keras-gemma` command (keras_gemma/cli.py)."""

import sys

from keras_gemma.cli import main

sys.exit(main())
