"""`rethinkbn --help` and each sub-command's help end with the docs page of that command."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from rethinkbn.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAV = (ROOT / "mkdocs.yml").read_text()


def help_text(*command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", [(), ("diagnose",), ("reproduce",), ("studies",)])
def test_help_names_an_existing_docs_page_of_the_site(command):
    pytest.importorskip("rethinkbn_studies")
    text = help_text(*command)
    pages = re.findall(r"Documentation: docs/(\S+\.md)", text)
    assert pages, f"rethinkbn {' '.join(command)} --help names no docs page:\n{text}"
    page = pages[-1]
    assert (ROOT / "docs" / page).is_file(), page
    assert f": {page}\n" in NAV, f"docs/{page} is not in mkdocs.yml's nav"


def test_each_command_has_its_own_page():
    assert "guide/diagnose.md" in help_text("diagnose")
    assert "reproduction.md" in help_text("reproduce")
    assert "index.md" in help_text()


def test_top_level_help_shows_no_markup():
    text = help_text()
    assert "`" not in text and ":data:" not in text, text
