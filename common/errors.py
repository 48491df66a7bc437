"""The exception types for mistakes a user can fix (bad setting, missing file, wrong checkpoint).

Command-line entry points catch :class:`UserError` and print its message as a single line
(no traceback unless ``--debug``); everything else is a bug and keeps its traceback.

Library code speaks Python: a bad value of a setting is a :class:`SettingError` that names the
field (``k=0: must be at least 1``); the command line words the same error with its flag
(``--k 0: must be at least 1``, see ``cli.run``).
"""


class UserError(Exception):
    """A problem with the user's input, worded as one line that names the file or setting and the fix."""


class SettingError(UserError, ValueError):
    """A setting (a config field or a function argument) with a value it cannot take.

    ``str(error)`` names the field (``k=0: must be at least 1``); :meth:`worded_as` names the
    command-line flag instead. Where ``problem`` suggests a value of the same setting, it writes
    ``{setting}`` before it (``"use {setting}cpu"``), so each edge words that its own way too
    (``use device=cpu`` / ``use --device cpu``). Also a ``ValueError``, as Python code expects of
    a bad value.
    """

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{name}={value!r}: {problem.replace(SETTING, name + '=')}")

    def worded_as(self, flag: str) -> str:
        """The same message with ``flag`` (e.g. ``--k``) in place of the field's name."""
        value = self.value
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        return f"{flag} {value}: {self.problem.replace(SETTING, flag + ' ')}"


SETTING = "{setting}"
