"""The one seeding scheme of the method: every random draw comes from a stream keyed by (stream, seed, ids).

A key is turned into a :class:`numpy.random.SeedSequence` and a PCG64 generator (or a torch generator seeded from the
same SeedSequence), so a draw depends only on its key: never on batching, sharding, call order or other draws.
The key is encoded injectively (the number of ids first, then every value as two 32-bit words), because a plain
``SeedSequence([stream, seed, *ids])`` gives the same state to ``[1, 5]`` and ``[1, 5, 0]``, and to ``[1, 2**32]``
and ``[1, 0, 1]``. Change :data:`SAMPLER_VERSION` whenever any stream's draws change: label shards record it.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

SAMPLER_VERSION = 1

_WORD = 1 << 32
_LIMIT = 1 << 64


class Stream(IntEnum):
    """Every stream of random draws of the method; a value is part of each key, so never reuse or renumber one."""

    RECOVER_INIT = 1  # a recover group's initial images, keyed by (seed, *group key)
    RECOVER_AUG = 2  # a recover group's SynthAug draws of every iteration, keyed by (seed, *group key)
    VIEW_COUNTS = 3  # which images keep one more view, keyed by (seed,)
    VIEW = 4  # the parameters of one kept view, keyed by (seed, image_id, view_id)
    VIEW_DRAW = 5  # the pool's uniform view of an image in an epoch, keyed by (seed, epoch, image_id)
    REAL_IMAGES = 6  # the random real images of a class (the baseline), keyed by (seed, class_id)
    SHARD_ASSIGN = 7  # ShardSampler: the shard order of an epoch, keyed by (seed, epoch)
    SHARD_ORDER = 8  # ShardSampler: a rank's image order within an epoch, keyed by (seed, epoch, rank)
    MODEL_INIT = 9  # a model's initial weights (torch.manual_seed of a training worker), keyed by (seed,)
    TRAIN_ORDER = 10  # DistributedSampler's shuffle of a training set (it adds the epoch), keyed by (seed,)
    SQUEEZE_VIEW = 11  # the random resized crop + flip of one real training image in squeeze, keyed by (seed, index)
    RDED_CANDIDATES = 12  # RDED: which real images of a class are candidates, keyed by (seed, class_id)
    RDED_CROPS = 13  # RDED: the crop boxes of one candidate, keyed by (seed, class_id, candidate position)


def _entropy(stream: Stream | int, seed: int, ids: tuple[int, ...]) -> list[int]:
    """The key as 32-bit words: stream, number of ids, then (low, high) of the seed and of every id."""
    if int(stream) not in Stream._value2member_map_:
        raise ValueError(f"unknown random stream {stream!r} (allowed: one of {', '.join(s.name for s in Stream)})")
    words = [int(stream), len(ids)]
    for name, value in (("seed", seed), *((f"id {k}", v) for k, v in enumerate(ids))):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < _LIMIT:
            raise ValueError(f"random stream {Stream(int(stream)).name}: {name} is {value!r}, but seeds and ids must be "
                             f"integers in [0, 2**64)")
        words += [int(value) % _WORD, int(value) // _WORD]
    return words


def seed_sequence(stream: Stream | int, seed: int, *ids: int) -> np.random.SeedSequence:
    """The SeedSequence of the key (stream, seed, *ids); ValueError for an unknown stream or a negative value."""
    return np.random.SeedSequence(_entropy(stream, seed, ids))


def generator(stream: Stream | int, seed: int, *ids: int) -> np.random.Generator:
    """A numpy PCG64 generator keyed by (stream, seed, *ids): the same key gives the same draws, anywhere."""
    return np.random.Generator(np.random.PCG64(seed_sequence(stream, seed, *ids)))


def torch_seed(stream: Stream | int, seed: int, *ids: int) -> int:
    """A 64-bit torch seed drawn from the key's SeedSequence (for torch.manual_seed or a torch.Generator)."""
    low, high = seed_sequence(stream, seed, *ids).generate_state(2, np.uint32)
    return int(low) | (int(high) << 32)


def sampler_seed(seed: int) -> int:
    """The seed of a torch DistributedSampler (which shuffles with ``seed + epoch``): TRAIN_ORDER, below 2**62."""
    return torch_seed(Stream.TRAIN_ORDER, seed) >> 2


def torch_generator(stream: Stream | int, seed: int, *ids: int) -> torch.Generator:
    """A CPU torch generator keyed by (stream, seed, *ids), for the draws that must be torch's (e.g. torch.randn)."""
    gen = torch.Generator()
    gen.manual_seed(torch_seed(stream, seed, *ids))
    return gen
