"""Take a finished run away: ``python jobs/export.py --run-dir R --to DIR`` writes DIR/images/<class>/*.png (an
ImageFolder tree), DIR/labels.parquet (the label pool) and DIR/README.md (every column, how to rebuild a view)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from lpld_ray.errors import LpldError
from lpld_ray.pipeline.export import export_run

log = logging.getLogger("lpld_ray")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True,
                        help="a finished run: a path, or an s3:// or gs:// URI (credentials from AWS_* variables)")
    parser.add_argument("--to", required=True, help="a new or empty local folder to write the export to")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export; 0 when done, 2 (one-line error, nothing written) on input it refuses."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = export_run(args.run_dir, args.to)
    except LpldError as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s: images/ (%d images, %d class folders), labels.parquet (%d records), README.md",
             summary.dest, summary.images, summary.classes, summary.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
