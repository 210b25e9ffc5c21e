"""Workflow configuration: JSON-schema validation with defaults, and ``cytonet validate``.

The schema lives in ``cytonet/schemas/config.schema.yaml`` (``workflow/schemas`` links to it). Validation fills in
every default, so the rules and the stage modules always see a complete config, and it fails before any job starts
with a message that names the offending key (and suggests the closest valid one for a misspelling).
``cytonet validate`` also prints the plan (``cytonet.io.plan``: which stages will run, and why) and refuses one
that cannot run.
"""

from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cytonet.io.annotations import is_set
from cytonet.io.plan import PlanError, check_plan, describe, plan_stages
from cytonet.io.tables import SCHEMA_DIR, TableError, load_all_sections, load_areas


class ConfigError(ValueError):
    """The configuration does not match the schema."""


def _fill_defaults(schema: dict, value: dict) -> None:
    """Insert schema defaults into ``value`` recursively (objects only)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if isinstance(value.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, value[key])


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        parts = []
        for key in extra:
            full = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parts.append(f"unknown config key '{full}'{hint}")
        return "; ".join(parts) + f". Allowed keys{' under ' + where if where else ''}: {', '.join(allowed)}"
    return f"config key '{where or '<top>'}': {error.message}"


def validate_config(config: dict[str, Any], schema_path: str | Path | None = None) -> dict[str, Any]:
    """Return a validated copy of ``config`` with all defaults filled; raise ConfigError naming the bad key."""
    schema = yaml.safe_load(Path(schema_path or SCHEMA_DIR / "config.schema.yaml").read_text())
    filled = copy.deepcopy(dict(config))
    _fill_defaults(schema, filled)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("\n".join(_describe(e, schema) for e in errors))
    return filled


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML config file as written (no defaults filled in)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    return validate_config(read_config_file(path))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet validate``."""
    parser.add_argument("config", nargs="?", default="config.yaml", help="config file (default: config.yaml)")
    parser.add_argument("--no-files", action="store_true", help="do not check that image files exist")


def run(args: argparse.Namespace) -> int:
    """Validate the config and every table it names; print a summary and the plan (which stages run, and why)."""
    try:
        written = read_config_file(args.config)
        config = validate_config(written)
        areas = load_areas(config["areas"])
        sections = load_all_sections(config["brains"], not args.no_files, config["section_thickness_um"])
        plan = plan_stages(config, sections)
        check_plan(plan, config, areas=config["areas"], user_config=written, sections=sections)
    except (ConfigError, TableError, PlanError) as exc:
        print(f"error: {exc}")
        return 1
    per_brain = sections.groupby("brain_id").size()
    print(f"config {args.config} is valid: {len(areas)} areas, {len(per_brain)} brains, {len(sections)} sections")
    labelled = sections[sections["annotation"].map(is_set)].groupby("brain_id").size()
    roles = sections.groupby("brain_id")["role"].first()
    for brain, n in per_brain.items():
        k = int(labelled.get(brain, 0))
        unused = " (an unknown brain's labels never train)" if k and roles[brain] != "known" else ""
        print(f"  {brain} ({roles[brain]}): {n} sections, {k} annotated{unused}")
    print("\n".join(describe(plan)))
    return 0
