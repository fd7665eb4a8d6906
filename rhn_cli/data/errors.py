"""The exceptions the data layer raises for the user to read."""

from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset cannot be fetched, verified, prepared or loaded.

    The message is one line, says what went wrong and, where there is one, what to do
    about it: the CLI prints it as it is.
    """


class UnknownDatasetError(DatasetError, KeyError):
    """No dataset of that name is registered (a usage error, not a data problem)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataInputError(DatasetError):
    """The data the config points at cannot be trained on as it is: a text file that is
    empty or not UTF-8 text, or a cache changed since it was prepared. The user fixes
    it (a usage error, exit 2), unlike a failed download or a full disk."""
