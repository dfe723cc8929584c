"""Argument parsing shared by the training scripts: flags (HfArgumentParser) or one YAML/JSON file."""

from __future__ import annotations

import sys

from transformers import HfArgumentParser


def parse_args(dataclass_types, argv=None):
    """`script.py config.yaml [--flag value ...]` or flags alone; flags after the file override it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        import json

        import yaml

        path = argv.pop(0)
        with open(path) as f:
            values = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        flags = []
        for key, value in values.items():
            if isinstance(value, bool):
                flags += [f"--{key}", str(value)]
            elif value is not None:
                flags += [f"--{key}", str(value)]
        argv = flags + argv
    return parser.parse_args_into_dataclasses(args=argv)
