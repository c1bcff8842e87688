"""Check the distributions `python -m build` wrote into DIST against the tracked source tree.

    python .ci/check_dist.py DIST

- the sdist is the whole tracked tree (`git ls-files`): every tracked file is in it, so its tests
  run from the unpacked sdist as from a clone (conftest.py, bn_reference.py, gloo_world.py, the
  constraints files, the docs and the CI script the tests read), and it holds nothing else but
  the metadata setuptools adds (PKG-INFO, setup.cfg, src/*.egg-info/);
- the wheel holds the packages' tracked files under src/ and nothing else of the tree, the
  LICENSE (byte for byte, as the metadata's License-File) and rethinkbn/py.typed.

Exit status 1 with one line per problem; 0 with a summary line.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What setuptools adds to an sdist beside the tree (the metadata), as path prefixes.
SDIST_METADATA = ("PKG-INFO", "setup.cfg", "src/rethinkbn.egg-info/")


def tracked() -> set[str]:
    """The files of the checkout, as `git ls-files` names them (relative, '/'-separated)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return {name for name in out.split("\0") if name and (ROOT / name).is_file()}


def one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"check_dist: expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def sdist_problems(sdist: Path, files: set[str]) -> list[str]:
    with tarfile.open(sdist) as tar:
        members = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    shipped = set(members)
    missing = sorted(files - shipped)
    extra = sorted(n for n in shipped - files if not n.startswith(SDIST_METADATA))
    return ([f"sdist lacks tracked file {n} (add it to MANIFEST.in)" for n in missing]
            + [f"sdist ships untracked file {n} (prune it in MANIFEST.in)" for n in extra])


def wheel_problems(wheel: Path, files: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = whl.read(licenses[0]) if licenses else b""
    problems = []
    if license_text != (ROOT / "LICENSE").read_bytes():
        problems.append("wheel lacks the LICENSE (as *.dist-info/licenses/LICENSE, byte for byte)")
    packaged = {n.removeprefix("src/") for n in files if n.startswith("src/")}
    problems += [f"wheel lacks {n}" for n in sorted(packaged - names)]
    problems += [f"wheel ships {n}, which is not a package file"
                 for n in sorted(names) if ".dist-info/" not in n and n not in packaged]
    if "rethinkbn/py.typed" not in names:
        problems.append("wheel lacks rethinkbn/py.typed (PEP 561: the annotations are public)")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit(__doc__)
    dist, files = Path(argv[0]), tracked()
    sdist, wheel = one(dist, "*.tar.gz"), one(dist, "*.whl")
    problems = sdist_problems(sdist, files) + wheel_problems(wheel, files)
    for problem in problems:
        print(f"check_dist: {problem}")
    if not problems:
        print(f"check_dist: {sdist.name} ships the {len(files)} tracked files; {wheel.name} "
              "ships the packages, LICENSE and py.typed")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
