"""Data stage: schema names, ingest, the store, sampler and loader."""
