"""Stage parameters on the command line: ``--params`` (a JSON object, or a YAML/JSON file) plus ``--param K=V``.

The workflow passes each stage's config section as one JSON object through ``params:``, so a changed value
reruns the stage; users running a stage by hand may give a file or single keys instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--params`` and ``--param`` to a stage's parser."""
    parser.add_argument("--params", help="parameters as a JSON object, or a YAML/JSON file of them")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="set one parameter (value parsed as YAML: 1e-3, true, null); repeat")


def parse_params(params: str | None, pairs: Sequence[str] | None = None) -> dict[str, Any]:
    """Merge ``--params`` (JSON text or a file path) and ``--param key=value`` pairs into one dict."""
    result: dict[str, Any] = {}
    if params:
        text = params if params.lstrip().startswith("{") else Path(params).read_text()
        loaded = yaml.safe_load(text) or {}  # YAML is a superset of JSON
        if not isinstance(loaded, dict):
            raise ValueError(f"--params {params!r}: must hold a mapping of keys")
        result.update(loaded)
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        result[key.strip()] = yaml.safe_load(value)
    return result


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters given on a stage's command line."""
    return parse_params(args.params, args.param)


def with_defaults(defaults: dict[str, Any], cfg: dict[str, Any] | None, stage: str) -> dict[str, Any]:
    """``defaults`` updated by ``cfg``; an unknown key is a ValueError that names it and the stage."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {stage} config key(s): {', '.join(unknown)}; known: {', '.join(defaults)}")
    return {**defaults, **cfg}
