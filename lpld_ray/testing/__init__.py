"""Support for tests and benchmarks (counting S3 server, local multi-node Ray, tiny datasets); never imported by the pipeline."""
