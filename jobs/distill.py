"""Entry point: ``python jobs/distill.py --config jobs/configs/X.yaml --run-dir URI`` (standalone or under ray job submit)."""

import sys

from lpld_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
