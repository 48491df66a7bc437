"""Speed and accuracy scripts that print tables. Run them as modules from the repository root,
which makes the project importable without touching ``sys.path``::

    python -m benchmarks.accuracy --help
"""
