"""The ``vqatune`` command. Subcommands live next to the code they drive."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError


def _info(args: argparse.Namespace) -> int:
    from ..provenance import environment

    for key, value in environment().items():
        print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqatune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print library versions and the device")
    info.set_defaults(func=_info)
    from .ask import add_parser as add_ask
    from .profile import add_parser as add_profile
    from .serve import add_parser as add_serve

    add_ask(sub)
    add_profile(sub)
    add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"vqatune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
