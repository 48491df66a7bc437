"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong checkpoint).

Command-line entry points catch :class:`UserError` and print its message as a single line
(no traceback unless ``--debug``); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, worded as one line that names the file or flag and the fix."""
