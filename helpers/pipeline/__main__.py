"""python -m helpers.pipeline: see helpers.pipeline."""
import sys

from helpers.pipeline.experiments import main

sys.exit(main())
