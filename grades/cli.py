"""Command line: grades env | demo | ttc (grades COMMAND --help for each)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _env(args: argparse.Namespace) -> int:
    from .env import report
    info = report()
    if args.json:
        print(json.dumps({name: v["available"] for name, v in info["backends"].items()}))
        return 0
    print(f"grades {info['grades']}  torch {info['torch']}  python {info['python']}")
    print(f"cuda device: {info['cuda_device'] or 'none'}")
    for name, v in info["backends"].items():
        mark = "yes" if v["available"] else "no "
        print(f"  {name:<10} {mark}  {v['detail']}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("grades")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="grades", description=__doc__)
    parser.add_argument("--version", action="version", version=f"grades {_version()}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    p_env = sub.add_parser("env", help="which backends are available, and why not",
                           description="Build what can be built and print which backends are available, and why not.")
    p_env.add_argument("--json", action="store_true", help="print one boolean per backend as JSON")
    sub.add_parser("demo", help="train a tiny model twice (AdamW vs FrozenAwareAdamW + GradES) and run the TTC evaluator",
                   add_help=False)
    sub.add_parser("ttc", help="test-time-compute table and choice from a samples JSONL", add_help=False)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "ttc":
        from .ttc.cli import main as ttc_main
        return ttc_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "env":
        return _env(args)
    parser.error(f"unknown command {args.cmd}")
    return 2
