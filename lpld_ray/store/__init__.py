"""Run storage: URIs over fsspec (the only fsspec user), manifests, the lease, the run record, codecs."""
