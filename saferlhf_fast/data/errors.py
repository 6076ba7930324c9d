"""Errors about input data: one line naming the file, the row and the field."""
from __future__ import annotations

from contextlib import contextmanager


class DataError(ValueError):
    """Bad input data.  ``str(err)`` is one line: ``<source>: row <n>: field '<name>': <problem>``; an error about
    a dataset spec rather than a file's rows (an unknown name, a missing file) names its flag instead:
    ``--train_datasets: <problem>``.

    The command line prints it to stderr and exits with status 2.
    """

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None, flag: str | None = None):
        parts = [str(x) for x in (flag, source) if x is not None]
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(": ".join(parts).replace("\n", " "))
        self.message, self.source, self.row, self.field, self.flag = message, source, row, field, flag


@contextmanager
def for_flag(flag: str | None):
    """Inside, a ``DataError`` that names no file (a bad spec, an unknown name, a missing file) names ``flag``."""
    try:
        yield
    except DataError as err:
        if flag is None or err.source is not None or err.flag is not None:
            raise
        raise DataError(err.message, row=err.row, field=err.field, flag=flag) from None


def describe(value) -> str:
    """Short description of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
