"""The README and the docs pages are specifications: the README's two commands, and every code
block of the README and of the docs pages, run (or say why they do not)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Generated reports (docs/results/**) hold no code blocks of ours; every other page does.
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")
               if "results" not in p.relative_to(ROOT / "docs").parts)
# A fenced block: its language, its code, and an HTML comment just before it, if any.
FENCE = re.compile(r"(?:<!-- (?P<note>[^\n]*?) -->\n)?^```(?P<lang>[^\n]*)\n(?P<code>.*?)^```$",
                   flags=re.S | re.M)
RUN = {"python", "bash"}  # languages that run
SHOWN = {"text"}          # output, or text that is not code


def code_blocks(lang: str, text: str = README) -> list[str]:
    return [m["code"] for m in FENCE.finditer(text) if m["lang"] == lang]


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, note) of every fenced block, in document order."""
    return [(m["lang"], m["code"], m["note"]) for m in FENCE.finditer(text)]


def skipped(note: str | None) -> bool:
    return note is not None and note.startswith("not run:")


def test_readme_opens_with_two_commands_install_and_run_then_test():
    first, second = code_blocks("bash")[:2]
    assert README.index("```bash") < README.index("##"), "the commands come before any section"
    assert "constraints.txt" in first and first.strip().endswith("rethinkbn reproduce --quick")
    assert "constraints.txt" in second and second.strip().endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    second = code_blocks("bash")[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines()


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(code_blocks("python")):
        code = compile(block, f"README.md:python-block-{i}", "exec")
        exec(code, namespace)  # noqa: S102 - the README's snippets are the specification


@pytest.mark.parametrize("page", ["README.md", *PAGES])
def test_every_code_block_runs_or_says_why_not(page):
    """Every block is python or bash (run), text (shown), or marked `<!-- not run: why -->`."""
    for lang, code, note in blocks((ROOT / page).read_text()):
        first = code.strip().splitlines()[0] if code.strip() else ""
        assert lang in RUN | SHOWN, (
            f"{page}: a ```{lang} block ({first!r}): use python, bash or text")
        if skipped(note):
            assert lang in RUN and len(note) > len("not run: ") + 10, (
                f"{page}: {note!r} must say why the block {first!r} does not run")


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_code_blocks_run(page, tmp_path, monkeypatch):
    """The page's python blocks in one namespace and its bash blocks, in page order, in one
    working directory (a block may use what an earlier one wrote)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, (lang, code, note) in enumerate(blocks((ROOT / page).read_text())):
        if lang not in RUN or skipped(note):
            continue
        if lang == "python":
            exec(compile(code, f"{page}:block-{i}", "exec"), namespace)  # noqa: S102
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{page}:block-{i} failed:\n{done.stdout}{done.stderr}"


def test_every_test_the_readme_names_exists():
    """A promise in the README or the docs names the test that holds it: that test must exist."""
    texts = [README, *((ROOT / page).read_text() for page in PAGES)]
    named = [hit for text in texts
             for hit in re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?`", text)]
    assert named, "the README names the tests behind its promises"
    for module, function in named:
        path = ROOT / "tests" / module
        assert path.exists(), f"the docs name {module}, which does not exist"
        if function:
            assert re.search(rf"def {function}\b", path.read_text()), (
                f"the docs name {module}::{function}, which does not exist")


def _slug(heading: str) -> str:
    """The anchor mkdocs (and GitHub, for these headings) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_every_link_of_the_readme_into_the_docs_exists_with_its_anchor():
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([\w-]+))?\)", README)
    assert len(links) >= 20, "the README links into the docs"
    for path, anchor in links:
        target = ROOT / path
        assert target.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
            assert anchor in [_slug(h) for h in headings], f"README: {path}#{anchor}"


def test_the_i_want_to_table_reaches_every_feature_in_one_click():
    table = README[README.index("## I want to"):README.index("## The latest reproduction")]
    rows = [row for row in table.splitlines() if row.startswith("| ") and "](docs/" in row]
    features = ["precise_bn", "GhostBatchNorm", "FrozenBatchNorm", "DomainBatchNorm",
                "SyncBatchNorm", "convert_batchnorm", "revert_batchnorm", "fold_batchnorm",
                "StatsBank", "batch_stats_inference", "ShuffledModule", "virtual_devices",
                "diagnose", "rethinkbn reproduce", "lightning", "timm", "ema_report",
                "recompute_stats", "Moments", "nonfinite_report"]
    for feature in features:
        assert any(feature in row for row in rows), f"no 'I want to' row for {feature}"
