"""User-facing errors.

Every problem a user can cause (a bad argument, a missing file, an unknown task) raises
`SlimlmError` with a message that names the problem and the fix. The CLI prints these
messages without a traceback; anything else is a bug and keeps its traceback.
"""


class SlimlmError(Exception):
    """An error caused by input or environment, with a message that says how to fix it."""
