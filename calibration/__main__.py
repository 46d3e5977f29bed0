import sys

from vllm_rsparse.calibration.cli import main

sys.exit(main())
