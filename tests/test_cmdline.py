"""The command lines a manifest records: the one typed, or the one equivalent to an API call."""
from __future__ import annotations

import shlex

from robaudit.cmdline import command_line, invoked_command


def test_command_line_repeats_lists_drops_none_and_quotes():
    line = command_line("analyze", "my model.pt2", dataset="digits", image_size=None, attack=["fgsm", "pgd:eps=8/255"],
                        class_map="a b.json", seed=0)
    assert shlex.split(line) == ["robaudit", "analyze", "my model.pt2", "--dataset", "digits", "--attack", "fgsm",
                                 "--attack", "pgd:eps=8/255", "--class-map", "a b.json", "--seed", "0"]
    assert command_line("harden", run="r", attack=[]) == "robaudit harden --run r"


def test_invoked_command_is_the_typed_line_of_the_robaudit_program_only():
    assert invoked_command(["/usr/bin/robaudit", "analyze", "m.pt2", "--eps", "8/255, 16/255"]) == \
        "robaudit analyze m.pt2 --eps '8/255, 16/255'"
    assert invoked_command(["pytest", "-q"]) is None
    assert invoked_command([]) is None
