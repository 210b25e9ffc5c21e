"""``cytonet make-demo``: generate the demo brains, one brain, or a huge benchmark section."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from .params import DemoConfigError, DemoParams

_OVERRIDES = [f for f in fields(DemoParams) if f.name != "out_dir"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the make-demo options."""
    parser.add_argument("--out", type=Path, help="output folder (default: demo.out_dir of the config, or 'demo')")
    parser.add_argument("--config", type=Path, help="config YAML; its 'demo:' section gives the parameters")
    parser.add_argument("--params", help="the demo parameters as one JSON object (what the workflow passes)")
    parser.add_argument("--tables-only", action="store_true", help="write only areas.csv and brains.csv")
    parser.add_argument("--brain", help="generate only this brain (e.g. demo1)")
    parser.add_argument("--big-section", type=int, metavar="SIZE_PX",
                        help="benchmark mode: write one SIZE_PX x SIZE_PX section tile by tile")
    parser.add_argument("--output", type=Path, help="benchmark mode: output .ome.tif path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("demo parameters (override the config)")
    for f in _OVERRIDES:
        typ = type(f.default)
        opt = "--" + f.name.replace("_", "-")
        if typ is bool:
            g.add_argument(opt, type=lambda s: s.lower() in ("1", "true", "yes", "on"), metavar="BOOL",
                           default=None, help=f"(default {f.default})")
        else:
            g.add_argument(opt, type=typ, default=None, help=f"(default {f.default})")


def _demo_cfg(args: argparse.Namespace) -> dict:
    cfg: dict = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            cfg = dict((yaml.safe_load(fh) or {}).get("demo") or {})
    if args.params:
        import json

        cfg.update(json.loads(args.params))
    # `enabled` belongs to the workflow (use the demo as input or not), not to the generator.
    cfg.pop("enabled", None)
    for f in _OVERRIDES:
        val = getattr(args, f.name, None)
        if val is not None:
            cfg[f.name] = val
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run make-demo; returns the exit status."""
    from . import demo

    t0 = time.time()
    try:
        cfg = _demo_cfg(args)
        if args.big_section:
            if not args.output:
                print("make-demo: --big-section needs --output PATH", file=sys.stderr)
                return 2
            from .big import write_big_section

            p = DemoParams.from_cfg(cfg)
            px = cfg.get("pixel_size_um", 2.0)
            path = write_big_section(args.output, args.big_section, px, p.seed, progress=not args.no_progress,
                                     n_jobs=p.n_jobs)
            print(f"wrote {path} ({args.big_section}x{args.big_section} px at {px} um) in {time.time() - t0:.1f} s")
            return 0
        p = DemoParams.from_cfg(cfg)
        out = args.out or Path(p.out_dir)
        if args.tables_only:
            areas, brains = demo.write_tables(p, out)
            print(f"wrote {areas} and {brains}")
            return 0
        if args.brain:
            # The tables are written by their own job (--tables-only), so parallel brain jobs never race on them.
            table = demo.generate_brain(args.brain, p, out, progress=not args.no_progress)
            print(f"wrote brain {args.brain}: {table}")
        else:
            brains = demo.generate_demo(p, out, progress=not args.no_progress)
            print(f"wrote {brains} and {out / 'areas.csv'}")
        print(f"previews in {out / 'previews'}; done in {time.time() - t0:.1f} s")
        return 0
    except (DemoConfigError, ValueError, OSError) as exc:
        print(f"make-demo: {exc}", file=sys.stderr)
        return 2
