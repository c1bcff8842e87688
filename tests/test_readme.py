"""The README is a specification: its two commands, and every Python snippet in it, run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


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


def test_every_test_the_readme_names_exists():
    """A promise in the README names the test that holds it: that test must exist."""
    named = re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?`", README)
    assert named, "the README names the tests behind its promises"
    for module, function in named:
        path = ROOT / "tests" / module
        assert path.exists(), f"README names {module}, which does not exist"
        if function:
            assert re.search(rf"def {function}\b", path.read_text()), (
                f"README names {module}::{function}, which does not exist")
