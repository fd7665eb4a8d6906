"""Datasets: the registry, corpora and reference batching. Never imports models."""
