"""The exception types for mistakes a user can fix (bad setting, missing file, wrong checkpoint).

Command-line entry points catch :class:`UserError` and print its message as a single line
(no traceback unless ``--debug``); everything else is a bug and keeps its traceback.

Library code speaks Python: a bad value of a setting is a :class:`SettingError` that names the
field (``k=0: must be at least 1``); the command line words the same error with its flag
(``--k 0: must be at least 1``, see ``cli.run``).
"""

import re


class UserError(Exception):
    """A problem with the user's input, worded as one line that names the file or setting and the fix."""


class SettingError(UserError, ValueError):
    """A setting (a config field or a function argument) with a value it cannot take.

    ``str(error)`` names the field (``k=0: must be at least 1``); :meth:`worded_as` names the
    command-line flag instead. Where ``problem`` suggests a value of the same setting, it writes
    ``{setting}`` before it (``"use {setting}cpu"``); where it suggests another setting, it writes
    it in backticks (``"set `certify=False`"``). So each edge words those its own way too: ``use
    device=cpu``, ``set certify=False`` in Python; ``use --device cpu``, ``set --uncertified`` on
    the command line. Also a ``ValueError``, as Python code expects of a bad value.
    """

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        text = OTHER_SETTING.sub(lambda match: f"{match[1]}={match[2]}", problem.replace(SETTING, name + "="))
        super().__init__(f"{name}={value!r}: {text}")

    def worded_as(self, flags: dict[str, str]) -> str:
        """The message in a command line's words: ``flags`` maps a setting to its flag (``{"k":
        "--k"}``) and a setting's value to a switch (``{"certify=False": "--uncertified"}``)."""
        def flag_of(name: str, value: str) -> str:
            return flags.get(f"{name}={value}") or (f"{flags[name]} {value}" if name in flags else f"{name}={value}")

        value = self.value
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        flag = flags.get(self.name, self.name)
        problem = self.problem.replace(SETTING, flag + " ")
        problem = OTHER_SETTING.sub(lambda match: flag_of(match[1], match[2]), problem)
        return f"{flag} {value}: {problem}"


SETTING = "{setting}"
OTHER_SETTING = re.compile(r"`(\w+)=([^`]*)`")
