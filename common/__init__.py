"""What the two stages and the entry points share, below or beside them.

- below both stages (import neither stage nor the command line): ``errors`` (the user-error
  types), ``runtime`` (device, bfloat16, workers, precision), ``settings`` (the config
  dataclasses' base), ``fileio`` (atomic writes), ``provenance`` (code and package versions);
- above them: ``recipes`` (named training + scoring settings) and ``cli`` (what every command
  line shares: one-line errors, common flags).

Nothing is imported here: ``from common import cli`` loads only what it names.
"""
