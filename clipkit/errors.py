"""Errors a user can fix, reported by the CLI in one line without a traceback."""


class DataError(Exception):
    """Bad data: a missing path, an empty or all-bad source, too many bad samples."""
