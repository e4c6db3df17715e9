"""Errors a user can fix, reported by the CLI in one line without a traceback."""


class DataError(Exception):
    """Bad data: a missing path, an empty or all-bad source, too many bad samples."""


class TrainingDiverged(Exception):
    """The loss or gradients stayed non-finite for too many optimiser steps in a row."""


class ResumeError(Exception):
    """A run cannot be continued from the checkpoint asked for: damaged, missing, or trained otherwise."""


class UsageError(Exception):
    """A bad command line or config choice: reported in one line, exit code 2."""
