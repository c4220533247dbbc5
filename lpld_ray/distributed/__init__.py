"""Shard queue, actors and Ray Train runs: the only importer of ray."""
