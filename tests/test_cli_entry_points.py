"""``rethinkbn``'s sub-commands from other packages: the entry point group ``rethinkbn.commands``.

The library's CLI never imports the studies; ``reproduce`` and ``studies`` reach it through the
installed metadata (``pyproject.toml``), and a command whose module does not import still parses
and says, in one line, which extra to install.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import pytest

from rethinkbn.cli import COMMANDS_GROUP, build_parser, main


def test_reproduce_and_studies_are_registered_by_the_studies_package():
    points = {p.name: p for p in entry_points(group=COMMANDS_GROUP)}
    assert {"reproduce", "studies"} <= set(points), (
        "the installed metadata lacks the rethinkbn.commands entry points: "
        "pip install -e . again after editing pyproject.toml")
    for name in ("reproduce", "studies", "variation"):
        assert points[name].module == "rethinkbn_studies.cli"
        assert points[name].extras == ["studies"]
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(choices) == ["reproduce", "studies", "variation", "diagnose"]


@pytest.mark.parametrize("argv", [["studies"], ["reproduce", "--quick", "--only", "nbs"],
                                  ["reproduce", "--no-such-option"]])
def test_a_command_whose_module_does_not_import_says_which_extra_to_install(argv, monkeypatch,
                                                                            capsys):
    # what a missing package looks like, even where an earlier test imported it
    for name in [n for n in sys.modules if n.split(".")[0] == "rethinkbn_studies"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rethinkbn_studies", None)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rethinkbn {argv[0]}: error: ")
    assert "missing: rethinkbn_studies" in err and "pip install 'rethinkbn[studies]'" in err


@pytest.mark.parametrize("argv", [["reproduce", "--no-such-option"],
                                  ["diagnose", "mod:fn", "--no-such-option"]])
def test_an_available_command_still_refuses_an_unknown_option(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_the_studies_cli_module_imports_neither_the_harness_nor_the_extra():
    import subprocess

    code = ("import sys, rethinkbn.cli\nrethinkbn.cli.build_parser()\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in "
            "('rethinkbn_studies', 'matplotlib', 'mnist1d')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert eval(done.stdout) == ["rethinkbn_studies", "rethinkbn_studies.cli"]
