"""The root of every error the package raises on purpose.

Each module keeps its own error class (DataError, CheckpointError, JobError...), derived from
``RDError``, so a caller that only reports errors catches ``RDError``; one that can recover from a
particular kind catches that. The command line turns an ``RDError`` into ``error: <message>`` and
exit code 2.
"""


class RDError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""
