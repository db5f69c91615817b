"""`fol-ros` command line: one subcommand per job, each defined in fol_ros/commands/<area>.py.

Each commands module exposes `register(subparsers)`, which adds its parsers and sets `func` to a callable
taking the parsed namespace and returning an exit code. Heavy imports (torch, faiss) happen inside those
callables so that `fol-ros --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fol_ros.errors import FolError

COMMAND_MODULES = (
    'fol_ros.commands.model',     # describe, weights
    'fol_ros.commands.export',    # export onnx / tensorrt
    'fol_ros.commands.map',       # map build / info / compact
    'fol_ros.commands.eval',      # eval
    'fol_ros.commands.train',     # train
    'fol_ros.commands.config',    # config yaml / docs / show (the settings schema)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='fol-ros', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='FoL visual place recognition: descriptors, place maps, evaluation, export, training.')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', stream=sys.stderr)
    logging.getLogger(__name__).debug('argv: %s', sys.argv)
    try:
        return int(args.func(args) or 0)
    except FolError as exc:
        print(f'fol-ros {args.command}: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
