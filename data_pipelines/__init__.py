"""Data: the synthetic character set, real-video ingestion, the on-disk format and Grain pipelines."""
