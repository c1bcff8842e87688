"""Issue 22: the command line's --version, readable --seeds errors, --out's default, a help
without reST markup; the version read from the package metadata; LICENSE in the tree."""

from pathlib import Path

import pytest

import rethinkbn
from rethinkbn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rethinkbn {rethinkbn.__version__}"


def test_seeds_not_a_number_says_positive_integer(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "--seeds", "abc"])
    err = capsys.readouterr().err
    assert "expected a positive integer, got 'abc'" in err
    assert "_positive_int" not in err


def test_top_level_help_has_no_rest_markup_and_out_shows_default():
    parser = build_parser()
    assert "``" not in parser.format_help()
    reproduce = parser._subparsers._group_actions[0].choices["reproduce"]  # noqa: SLF001
    assert "default: rethinkbn-report" in reproduce.format_help()


def test_license_file_exists_and_is_declared():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license-files = ["LICENSE"]' in (ROOT / "pyproject.toml").read_text()
