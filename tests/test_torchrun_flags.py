"""Every flag of the scripts can be given after the script's name under torchrun.

torchrun's own parser takes abbreviations of its options even after the script's name: ``--p``
is refused as ambiguous (``--print-completion``?), so each option needs at least one spelling
that reaches the script unchanged (``--p`` has ``--checkpoint``).
"""

import argparse

import pytest

torchrun = pytest.importorskip("torch.distributed.run")

import main as train_main  # noqa: E402
from scoring.pipeline import cli as score_cli  # noqa: E402


def reaches_the_script(option: str, script: str) -> bool:
    parser = torchrun.get_args_parser()
    parser.exit = parser.error = lambda *a, **k: (_ for _ in ()).throw(SystemExit(2))  # quiet refusals
    try:
        args = parser.parse_args(["--nproc_per_node=2", script, option, "1"])
    except SystemExit:
        return False
    return args.training_script == script and args.training_script_args == [option, "1"]


@pytest.mark.parametrize("script, parser", [("inference_concatenation.py", score_cli.get_args_parser("concatenation")),
                                             ("main.py", train_main.get_args_parser())])
def test_every_option_has_a_spelling_torchrun_passes_on(script, parser: argparse.ArgumentParser):
    lost = [action.option_strings for action in parser._actions
            if action.option_strings and action.dest != "help"
            and not any(reaches_the_script(o, script) for o in action.option_strings if o.startswith("--"))]
    assert not lost, f"no spelling of these reaches {script} under torchrun: {lost}"
    assert not reaches_the_script("--p", script)  # why --checkpoint exists
