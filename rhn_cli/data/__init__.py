"""Datasets: the registry, fetching, tokenising, the cache, corpora and batching.

``registry`` says what each dataset is; ``fetch`` gets verified raw files; ``prepare``
tokenises them; ``cache`` keeps the result; ``store`` ties these together for
``rhn data`` and for ``load_corpus``. Never imports models, the engine, tracking or the
CLI.
"""
