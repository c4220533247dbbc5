"""Benchmark: the teacher stage's epoch code (DataLoader, flips, normalize, step) against a bare tensor loop of the same
model and data, side by side, per ConvNet width; and one evaluation of the test set."""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch.utils.data import DataLoader, Subset

from lpld_ray.config import DataConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.machine import describe_machine
from lpld_ray.method.images import normalize
from lpld_ray.method.models import build_model
from lpld_ray.method.training import evaluate, random_flip, train_epoch

log = logging.getLogger("bench_teacher")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--archs", nargs="+", default=["convnet", "convnet_w64"])
    p.add_argument("--images", type=int, default=10240, help="training images per timed pass")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    return p.parse_args()


def fresh_model(arch: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The teacher's model (channels-last, as the stage trains it) and its SGD, from one seed."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, 28).to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def stage_pass(arch: str, data: Subset, batch_size: int, spec) -> float:
    """Seconds for one pass of the stage's train_epoch over ``data``."""
    model, optimizer = fresh_model(arch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    started = time.perf_counter()
    train_epoch(model, loader, torch.nn.CrossEntropyLoss(), optimizer, schedule, spec, torch.device("cpu"), random_flip)
    return time.perf_counter() - started


def bare_pass(arch: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int, spec) -> float:
    """Seconds for one pass of a bare loop over in-memory tensors (no loader, no augmentation)."""
    model, optimizer = fresh_model(arch)
    model.train()
    started = time.perf_counter()
    for i in range(0, len(images) - batch_size + 1, batch_size):
        loss = torch.nn.functional.cross_entropy(model(normalize(images[i:i + batch_size], spec)), labels[i:i + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data = DataConfig(name="fashion_mnist", root=args.root)
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    subset = Subset(train, range(args.images))
    images = torch.stack([train[i][0] for i in range(args.images)])
    labels = torch.tensor([train[i][1] for i in range(args.images)])
    rows = {}
    for arch in args.archs:
        stage, bare = stage_pass(arch, subset, args.batch_size, train.spec), bare_pass(arch, images, labels,
                                                                                        args.batch_size, train.spec)
        model, _ = fresh_model(arch)
        started = time.perf_counter()
        evaluate(model, DataLoader(test, batch_size=500), test.spec, torch.device("cpu"))
        rows[arch] = {"stage_s": round(stage, 1), "bare_s": round(bare, 1), "stage_over_bare": round(stage / bare, 3),
                      "epoch_s_estimate": round(stage * len(train) / args.images), "eval_test_set_s":
                      round(time.perf_counter() - started, 1)}
    if len(args.archs) > 1:
        first, *others = args.archs
        for arch in others:
            rows[arch]["speedup_over_" + first] = round(rows[first]["stage_s"] / rows[arch]["stage_s"], 2)
    log.info(json.dumps({"images": args.images, "batch_size": args.batch_size, "threads": args.threads,
                         "machine": describe_machine(), "archs": rows}, indent=2))


if __name__ == "__main__":
    main()
