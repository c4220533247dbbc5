"""Benchmark: batched multi-class recover against one class at a time on the same work, side by side."""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from lpld_ray.config import RecoverConfig
from lpld_ray.machine import describe_machine
from lpld_ray.method.images import ImageSpec  # noqa
from lpld_ray.method.models import build_model
from lpld_ray.method.recover import BNTarget, class_wise_groups, recover_groups
from lpld_ray.method.squeeze import accumulate_bn_sums

log = logging.getLogger("bench_recover")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="convnet")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10, help="classes in the work (and in one batched pass)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--per-pass", type=int, default=0, help="classes per forward pass when batched (0: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    return p.parse_args()


def synthetic_targets(model: torch.nn.Module, classes: int, channels: int, size: int) -> list[BNTarget]:
    """Class statistics from random class-shifted images: timing does not depend on their values."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat(4)
    images = torch.randn(len(labels), channels, size, size, generator=gen) + labels.view(-1, 1, 1, 1) * 0.1
    return BNTarget.rows_of(accumulate_bn_sums(model, [(images, labels)], classes))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.arch, args.classes, args.channels, args.size).to(args.device).eval()
    targets = synthetic_targets(model.cpu(), args.classes, args.channels, args.size)
    model.to(args.device)
    spec = ImageSpec(args.channels, args.size, (0.5,) * args.channels, (0.25,) * args.channels)
    cfg = RecoverConfig(ipc=args.ipc, iterations=args.iterations, crop_scale=(0.5, 1.0), jitter=2)
    groups = class_wise_groups(list(range(args.classes)), args.ipc, targets, run_seed=0)
    per_pass = args.per_pass or len(groups)
    chunks = [groups[i : i + per_pass] for i in range(0, len(groups), per_pass)]
    batched = lambda: [recover_groups(model, chunk, cfg, spec, args.device) for chunk in chunks]  # noqa: E731
    one_by_one = lambda: [recover_groups(model, [g], cfg, spec, args.device) for g in groups]  # noqa: E731
    recover_groups(model, groups[:1], RecoverConfig(ipc=args.ipc, iterations=2), spec, args.device)  # warm-up
    rows = {"one_class_at_a_time": [], "batched": []}
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        rows["one_class_at_a_time"].append(timed(one_by_one))
        rows["batched"].append(timed(batched))
    work = args.classes * args.ipc * args.iterations
    best = {k: min(v) for k, v in rows.items()}
    report = {
        "machine": describe_machine(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "arch": args.arch, "size": args.size, "classes": args.classes, "ipc": args.ipc, "iterations": args.iterations,
        "classes_per_pass": per_pass,
        "seconds_best_of": args.repeats,
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "image_iterations_per_s": {k: round(work / v, 1) for k, v in best.items()},
        "speedup_batched_over_one_at_a_time": round(best["one_class_at_a_time"] / best["batched"], 2),
    }
    log.info(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
