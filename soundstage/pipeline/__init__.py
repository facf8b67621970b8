"""The stage engine. It knows nothing about audio or vision: stage declarations, fingerprints,
the runner (batches, resume, errors, progress), shards and executors."""
