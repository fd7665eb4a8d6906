"""Datasets: the registry, fetching, tokenising, the cache, corpora and batching.

From the bottom up: ``spec`` says what describes a dataset; ``fetch`` gets verified raw
files; ``prepare`` tokenises them; ``cache`` keeps the result; ``loading`` ties these
together to open a dataset's corpus; ``registry`` names every dataset and holds
``load_corpus``; ``store`` backs the ``rhn data`` commands. A module imports only those
below it (tests/test_architecture.py checks there is no cycle). Never imports models,
the engine, tracking or the CLI.
"""
