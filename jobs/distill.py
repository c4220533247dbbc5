"""Entry point: ``python jobs/distill.py --config jobs/configs/X.yaml --run-dir URI`` (standalone or under ray job submit)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpld_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
