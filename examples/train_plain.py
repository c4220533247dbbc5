"""Train a student on a finished run's distilled images and soft labels in a plain PyTorch loop: no Ray.

    python examples/train_plain.py --run-dir runs/fashion_mnist --epochs 20 --batch-size 32

The run directory gives everything: run.yaml (dataset, image size, student settings), the images shards and the
label pool. Each epoch the label pool serves every distilled image once, through one of its stored augmented views,
with the teacher's fp16 output for exactly that view; the student learns to match it (KD loss at temperature T).
Test accuracy is measured on the dataset's real test set. Copy this file and change what you like.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from lpld_ray.data.datasets import load_dataset
from lpld_ray.data.label_shards import LabelShards
from lpld_ray.data.pool import ImageSource, LabelPool
from lpld_ray.method.images import normalize
from lpld_ray.method.kd import SoftTargetKLLoss
from lpld_ray.method.models import build_model
from lpld_ray.store.run_record import read_run_config
from lpld_ray.store.storage import Store

log = logging.getLogger("train_plain")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a student on a run's label pool, without Ray.")
    parser.add_argument("--run-dir", required=True, help="a run whose recover and relabel stages have finished")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


@torch.no_grad()
def top1_accuracy(model: torch.nn.Module, test_set, device: torch.device) -> float:
    """Top-1 accuracy on the real test set."""
    model.eval()
    correct = 0
    for images, labels in DataLoader(test_set, batch_size=500):
        logits = model(normalize(images.to(device), test_set.spec))
        correct += int((logits.argmax(1).cpu() == labels).sum())
    return correct / len(test_set)


def main(argv: Sequence[str] | None = None) -> float:
    """Train for --epochs epochs, logging loss and test accuracy; returns the last test accuracy."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    store = Store(args.run_dir)  # a local path; s3://... works too (credentials from the AWS_* variables)
    cfg = read_run_config(store)  # the config the run was made with
    test_set = load_dataset(cfg.data, "test")
    spec = test_set.spec  # image size, channels, normalization

    # The label pool as a Dataset: records from the labels shards, images decoded from the images shards (each
    # object checked against its manifest), each view rebuilt exactly as the teacher saw it.
    images = ImageSource(store, cfg.recover.ipc, cache_bytes=512 << 20)
    pool = LabelPool(LabelShards(store), images, spec.size, sampling=cfg.train.view_sampling, seed=cfg.seed)
    log.info("label pool: %d images, %d classes", len(pool), pool.num_classes)

    model = build_model(cfg.train.arch, pool.num_classes, spec.channels, spec.size).to(device)
    loss_fn = SoftTargetKLLoss(cfg.train.temperature, cfg.train.label_smoothing, cfg.train.smoothing_on,
                               cfg.train.t_squared)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = -(-len(pool) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * batches)

    accuracy = 0.0
    for epoch in range(args.epochs):
        # Read this epoch's view of every image. A distributed job passes only its rank's indices here.
        pool.set_epoch(epoch)
        model.train()
        total, seen = 0.0, 0
        for views, teacher_logits in DataLoader(pool, batch_size=args.batch_size, shuffle=True):
            views, teacher_logits = views.to(device), teacher_logits.to(device)
            loss = loss_fn(model(normalize(views, spec)), teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, seen = total + loss.item() * len(views), seen + len(views)
        accuracy = top1_accuracy(model, test_set, device)
        log.info("epoch %d/%d: KD loss %.4f, test top-1 %.2f%%", epoch + 1, args.epochs, total / seen, 100 * accuracy)
    return accuracy


if __name__ == "__main__":
    main()
