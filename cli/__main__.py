"""`python -m gradcam_engine.cli ...` is the `gradcam` command."""
import sys

from gradcam_engine.cli.main import main

sys.exit(main())
