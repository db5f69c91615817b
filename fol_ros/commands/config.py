"""`fol-ros config yaml|docs|show`: the settings schema as the shipped params file, the docs table, or values.

    fol-ros config yaml [--write]      # config/fol_ros.yaml as generated from fol_ros/config.py
    fol-ros config docs [--write]      # the parameter table of docs/node.md
    fol-ros config show [--params F]   # the pipeline settings a command would run with (defaults < file)
"""
from __future__ import annotations

import argparse
import json

from fol_ros import schema


def register(subparsers) -> None:
    p = subparsers.add_parser('config', help='the settings schema: params file, docs table, effective values',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    sub = p.add_subparsers(dest='config_command', required=True, metavar='ACTION')
    for name, text in (('yaml', 'print (or --write) config/fol_ros.yaml'),
                       ('docs', 'print (or --write into docs/node.md) the parameter table')):
        s = sub.add_parser(name, help=text)
        s.add_argument('--write', action='store_true', help='update the file in the source tree')
        s.set_defaults(func=run_yaml if name == 'yaml' else run_docs)
    show = sub.add_parser('show', help='print the effective pipeline settings as JSON')
    schema.add_cli_options(show, tuple(schema.GROUPS))
    show.set_defaults(func=run_show)


def run_yaml(args: argparse.Namespace) -> int:
    text = schema.render_yaml()
    if args.write:
        target = schema.PACKAGE_ROOT / 'config' / 'fol_ros.yaml'
        target.write_text(text)
        print(f'wrote {target}')
    else:
        print(text, end='')
    return 0


def run_docs(args: argparse.Namespace) -> int:
    if args.write:
        target = schema.PACKAGE_ROOT / 'docs' / 'node.md'
        target.write_text(schema.splice_table(target.read_text()))
        print(f'wrote {target}')
    else:
        print(schema.render_table(), end='')
    return 0


def run_show(args: argparse.Namespace) -> int:
    config = schema.config_from_args(args)
    values = schema.flat_values(None, config)
    print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, indent=1))
    return 0
