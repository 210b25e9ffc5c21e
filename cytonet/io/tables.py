"""Brains, sections and areas tables: reading and validation (the user's data contract).

Tables are CSV or TSV (chosen by the file extension). Each row is validated against the JSON schema in
``cytonet/schemas/<kind>.schema.yaml`` (package data; ``workflow/schemas`` links to it), and every error names the
table, the row and the column at fault. Relative paths inside a table resolve against the table's folder.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from cytonet.io.transforms import SectionTransform, TransformError

# Inside the package, so a non-editable install (`pip install .`, a wheel) has them too.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
PATH_COLUMNS = {"sections": ("image", "annotation", "ground_truth"), "brains": ("sections",), "areas": ()}


class TableError(ValueError):
    """A brains, sections or areas table is missing, malformed or refers to something that does not exist."""


@cache
def load_schema(kind: str) -> dict:
    """Return the JSON schema for one row of a ``kind`` table (``sections``, ``brains`` or ``areas``)."""
    return yaml.safe_load((SCHEMA_DIR / f"{kind}.schema.yaml").read_text())


def read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """Read a CSV/TSV table, coerce its columns to the schema's types and validate every row."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{kind} table not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        # Read everything as text first: ids such as "007" must not become numbers.
        raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TableError(f"cannot parse {kind} table {path}: {exc}") from exc
    raw.columns = [c.strip() for c in raw.columns]
    schema = load_schema(kind)
    props = schema["properties"]
    unknown = [c for c in raw.columns if c not in props]
    if unknown:
        raise TableError(
            f"{kind} table {path}: unknown column(s) {unknown}; allowed columns are {sorted(props)}"
        )
    missing = [c for c in schema.get("required", []) if c not in raw.columns]
    if missing:
        raise TableError(f"{kind} table {path}: missing required column(s) {missing}")
    if raw.empty:
        raise TableError(f"{kind} table {path} has no rows")

    records = []
    for i, row in enumerate(raw.to_dict(orient="records")):
        line = i + 2  # header is line 1
        record = {col: _coerce(value.strip(), props[col], path, kind, line, col) for col, value in row.items()}
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(record), key=lambda e: e.path)
        if errors:
            err = errors[0]
            column = err.path[0] if err.path else "?"
            raise TableError(f"{kind} table {path}, line {line}, column '{column}': {err.message}")
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=list(raw.columns))
    for col in PATH_COLUMNS[kind]:
        if col in table:
            table[col] = [_resolve(v, path.parent) for v in table[col]]
    return table


def _coerce(value: str, prop: dict, path: Path, kind: str, line: int, col: str):
    """Turn one text cell into the JSON type its schema asks for (empty cells become None)."""
    if value == "":
        return None
    types = prop.get("type", "string")
    types = types if isinstance(types, list) else [types]
    try:
        if "integer" in types:
            number = float(value)
            return int(number) if number.is_integer() else number
        if "number" in types:
            number = float(value)
            if math.isnan(number):
                return None
            return number
    except ValueError:
        raise TableError(f"{kind} table {path}, line {line}, column '{col}': {value!r} is not a number") from None
    return value


def _resolve(value: str | float | None, base: Path) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check_unique(table: pd.DataFrame, column: str, path: Path, kind: str) -> None:
    dupes = table[column][table[column].duplicated()].unique().tolist()
    if dupes:
        raise TableError(f"{kind} table {path}: duplicate {column} {dupes}")


def load_areas(path: str | Path) -> pd.DataFrame:
    """Read and validate the areas table: ``area_id``, ``name``, ``color``; ids and names unique."""
    table = read_table(path, "areas")
    _check_unique(table, "area_id", Path(path), "areas")
    _check_unique(table, "name", Path(path), "areas")
    return table.sort_values("area_id").reset_index(drop=True)


def load_brains(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate the brains table; each brain's sections table must exist when ``check_files``."""
    path = Path(path)
    table = read_table(path, "brains")
    _check_unique(table, "brain_id", path, "brains")
    if check_files:
        for row in table.itertuples():
            if not Path(row.sections).is_file():
                raise TableError(f"brains table {path}: sections table of brain '{row.brain_id}' "
                                 f"not found: {row.sections}")
    return table


def load_sections(
    path: str | Path,
    brain_id: str | None = None,
    check_files: bool = True,
    section_thickness_um: float | None = None,
) -> pd.DataFrame:
    """Read and validate one brain's sections table.

    Returns absolute paths, a ``z_um`` for every row (from ``section_index`` × ``section_thickness_um`` when
    ``z_um`` is absent) and checks that every transform parses. With ``check_files`` a missing image or
    annotation is reported with its section id.
    """
    path = Path(path)
    where = f"sections table {path}" + (f" (brain '{brain_id}')" if brain_id else "")
    table = read_table(path, "sections")
    _check_unique(table, "section_id", path, "sections")
    for col in ("pixel_size_um", "z_um", "section_index", "annotation", "ground_truth"):
        if col not in table:
            table[col] = None
    z = []
    for row in table.itertuples():
        if row.z_um is not None and not pd.isna(row.z_um):
            z.append(float(row.z_um))
        elif row.section_index is not None and not pd.isna(row.section_index) and section_thickness_um:
            z.append(float(row.section_index) * section_thickness_um)
        else:
            raise TableError(
                f"{where}: section '{row.section_id}' has no z_um"
                + (" and no section_index" if section_thickness_um
                   else " (section_index needs config section_thickness_um)")
            )
        try:
            SectionTransform.from_spec(row.transform, path.parent)
        except TransformError as exc:
            raise TableError(f"{where}: section '{row.section_id}': bad transform: {exc}") from exc
        if check_files:
            for col in ("image", "annotation", "ground_truth"):
                value = getattr(row, col)
                if value is not None and not pd.isna(value) and not Path(value).exists():
                    raise TableError(f"{where}: section '{row.section_id}': {col} file not found: {value}")
    table["z_um"] = z
    if brain_id is not None:
        table.insert(0, "brain_id", brain_id)
    return table


def load_all_sections(brains_table: str | Path, check_files: bool = True,
                      section_thickness_um: float | None = None) -> pd.DataFrame:
    """All sections of all brains in one table, with ``brain_id`` and ``role`` columns."""
    brains = load_brains(brains_table, check_files=check_files)
    frames = []
    for brain in brains.itertuples():
        sections = load_sections(brain.sections, brain.brain_id, check_files, section_thickness_um)
        sections.insert(1, "role", brain.role)
        frames.append(sections)
    return pd.concat(frames, ignore_index=True)
