"""The `rethinkbn` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rethinkbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="reproduce the paper's studies at small scale")
    rep.add_argument("--quick", action="store_true", help="every study in a few minutes")
    sub.add_parser("studies", help="list the studies")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"rethinkbn {args.command}: the reproduction harness is not built yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
