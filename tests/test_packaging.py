"""What a user checks before `pip install`: a consistent sdist, a wheel with its LICENSE, the
release metadata, and the static and release checks in CI (issue 22, items 5 and 7).

Building the distributions takes seconds and the network, so the tests here read the config
(MANIFEST.in, pyproject.toml, .ci/run) and run .ci/check_dist.py on small archives; .ci/run builds
the real ones and runs the same checker on them.
"""

import fnmatch
import importlib.util
import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def manifest_ships(path: str) -> bool:
    """Whether MANIFEST.in puts the tracked file ``path`` (outside src/) into the sdist, read as
    setuptools reads it: root-level include patterns, graft/prune of folders, global-exclude of
    names; the last matching line wins."""
    shipped = False
    name = path.rsplit("/", 1)[-1]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        command, *args = line.split("#", 1)[0].split() or [""]
        if command == "include" and "/" not in path:
            shipped = shipped or any(fnmatch.fnmatchcase(path, p) for p in args)
        elif command in ("graft", "prune") and any(path.startswith(d + "/") for d in args):
            shipped = command == "graft"
        elif command == "global-exclude" and any(fnmatch.fnmatchcase(name, p) for p in args):
            shipped = False
    return shipped


def tracked_files() -> list[str]:
    git = shutil.which("git")
    result = git and subprocess.run([git, "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if not result or result.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist is the shipped tree itself)")
    return [n for n in result.stdout.splitlines() if (ROOT / n).is_file()]


def test_sdist_ships_the_test_helpers_and_constraints_the_tests_need():
    """Regression: the sdist shipped tests/test_*.py but not the helpers they import, so its
    tests did not collect, nor the constraints files its install command names."""
    for path in ("tests/conftest.py", "tests/bn_reference.py", "tests/gloo_world.py",
                 "constraints.txt", "constraints-interop.txt", "LICENSE", "README.md",
                 ".ci/run", "docs/DESIGN.md", "examples/ddp_train.py", "benchmarks/run.py"):
        assert manifest_ships(path), f"MANIFEST.in leaves {path} out of the sdist"


def test_manifest_ships_every_tracked_file():
    """The sdist is the tracked tree: a new tracked file outside the packages must be named by
    MANIFEST.in (src/ is shipped by setuptools' package discovery)."""
    files = tracked_files()
    left_out = [n for n in files if not n.startswith("src/") and not manifest_ships(n)]
    assert not left_out, f"tracked but not in the sdist: {left_out}; add them to MANIFEST.in"
    package_data = {"rethinkbn": PYPROJECT["tool"]["setuptools"]["package-data"]["rethinkbn"]}
    unshipped = [n for n in files if n.startswith("src/") and not n.endswith(".py")
                 and n.split("/")[-1] not in package_data.get(n.split("/")[1], [])]
    assert not unshipped, f"tracked under src/ but in no package: {unshipped}"


def test_release_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert set(project["urls"]) == {"Homepage", "Documentation", "Source", "Issues"}
    assert all(u.startswith("https://") for u in project["urls"].values())
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "src" / "rethinkbn" / "py.typed").exists()


def test_the_dev_extra_installs_the_ci_checks_pinned():
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    pins = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    for tool in ("ruff", "mypy", "types-tqdm", "build", "twine"):
        assert tool in dev, f"the dev extra lacks {tool}, which .ci/run needs"
        assert tool in pins, f"constraints.txt does not pin {tool}"
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy["strict"] is True and "ignore_errors" not in mypy


def test_ci_runs_lint_types_build_and_the_distribution_checks():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for step in ("ruff check src tests benchmarks examples", "mypy src/rethinkbn"):
        assert step in ci, f".ci/run lacks the step {step!r}"
    joined = "\n".join(ci)
    for step in ("python -m build", "twine check --strict", "python .ci/check_dist.py"):
        assert step in joined, f".ci/run lacks the step {step!r}"


# ---------------------------------------------------------------- .ci/check_dist.py itself
def load_check_dist():
    spec = importlib.util.spec_from_file_location("check_dist", ROOT / ".ci" / "check_dist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_sdist(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(f"rethinkbn-0.1.0/{name}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return path


def write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path


def test_check_dist_names_what_the_sdist_lacks_or_adds(tmp_path):
    check = load_check_dist()
    tracked = {"tests/conftest.py", "tests/test_x.py", "src/rethinkbn/__init__.py"}
    good = write_sdist(tmp_path / "good.tar.gz", [*tracked, "PKG-INFO", "setup.cfg",
                                                  "src/rethinkbn.egg-info/PKG-INFO"])
    assert check.sdist_problems(good, tracked) == []
    bad = write_sdist(tmp_path / "bad.tar.gz", ["tests/test_x.py", "src/rethinkbn/__init__.py",
                                                "notes.txt"])
    problems = check.sdist_problems(bad, tracked)
    assert any("lacks tracked file tests/conftest.py" in p for p in problems)
    assert any("untracked file notes.txt" in p for p in problems)


def test_check_dist_requires_the_license_and_py_typed_in_the_wheel(tmp_path):
    check = load_check_dist()
    tracked = {"src/rethinkbn/__init__.py", "src/rethinkbn/py.typed", "tests/test_x.py"}
    files = {"rethinkbn/__init__.py": b"", "rethinkbn/py.typed": b"",
             "rethinkbn-0.1.0.dist-info/licenses/LICENSE": (ROOT / "LICENSE").read_bytes()}
    assert check.wheel_problems(write_wheel(tmp_path / "a.whl", files), tracked) == []
    del files["rethinkbn-0.1.0.dist-info/licenses/LICENSE"]
    files["tests/test_x.py"] = b""
    problems = check.wheel_problems(write_wheel(tmp_path / "b.whl", files), tracked)
    assert any("lacks the LICENSE" in p for p in problems)
    assert any("ships tests/test_x.py" in p for p in problems)
