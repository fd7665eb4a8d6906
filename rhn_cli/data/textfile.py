"""Where a ``textfile`` corpus comes from (``data_path``), checked without reading it.

Light on purpose (no numpy): config validation calls :func:`textfile_paths` so a wrong
``data_path`` stops the command before any run is created.
"""

from __future__ import annotations

from pathlib import Path

from rhn_cli.data.errors import DatasetError
from rhn_cli.data.spec import SPLITS

TEXTFILE_DATASET = "textfile"  # its name in dataset=...
TEXT_LEVELS = ("char", "word")
SPLIT_PLACEHOLDER = "{split}"
DATA_PATH_FORMS = (
    "a UTF-8 text file (split 90/5/5), a directory holding train.txt, valid.txt and "
    "test.txt, or a path with {split} in it"
)


def textfile_paths(data_path: str) -> list[Path]:
    """The file to split 90/5/5 (one path), or the train, valid and test files (three).

    ``data_path`` is a file, a directory holding ``train.txt``, ``valid.txt`` and
    ``test.txt``, or a pattern such as ``corpus/ptb.{split}.txt``.
    """
    if SPLIT_PLACEHOLDER in data_path:
        paths = [Path(data_path.replace(SPLIT_PLACEHOLDER, split)).expanduser() for split in SPLITS]
    else:
        path = Path(data_path).expanduser()
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise DatasetError(f"data_path={data_path!r}: no such file or directory")
        paths = [path / f"{split}.txt" for split in SPLITS]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DatasetError(
            f"data_path={data_path!r}: {', '.join(missing)} not found (expected {DATA_PATH_FORMS})"
        )
    return paths
