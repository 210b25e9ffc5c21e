"""The model card of a model bundle (``cytonet export-model``): reading it and checking it against the user's data.

A bundle is a folder with ``weights.safetensors`` and ``model_card.json``. The weights need torch
(``cytonet.nn.bundle``); the card is plain JSON, so planning and ``cytonet validate`` check it here, without torch,
before any job starts. Every error names the bundle folder or the card file and the field at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = "cytonet-bundle/1"
CARD_NAME = "model_card.json"
WEIGHTS_NAME = "weights.safetensors"
# What load_bundle needs from the card; the rest (training data, evaluation, code version) is for people.
REQUIRED_FIELDS = ("format", "areas", "pixel_size_um", "patch_px", "input_px", "window_px", "normalisation",
                   "encoder", "weights")
PIXEL_SIZE_TOLERANCE = 0.01  # relative: 1 %, as for image metadata against the sections table


class BundleError(ValueError):
    """A model bundle is missing, malformed, or does not fit the data it is asked to map; names the file."""


def read_card(bundle: str | os.PathLike) -> dict[str, Any]:
    """The validated model card of the bundle folder ``bundle``."""
    folder = Path(bundle)
    if not folder.is_dir():
        what = "is a file, not a bundle folder" if folder.exists() else "does not exist"
        raise BundleError(f"model bundle {folder} {what} (write one with `cytonet export-model`)")
    path = folder / CARD_NAME
    if not path.is_file():
        raise BundleError(f"model bundle {folder}: {CARD_NAME} not found")
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"model card {path}: unreadable ({exc})") from exc
    if not isinstance(card, dict):
        raise BundleError(f"model card {path}: expected a JSON object, got {type(card).__name__}")
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"model card {path}: format {card.get('format')!r} is not {BUNDLE_FORMAT!r}")
    missing = [k for k in REQUIRED_FIELDS if k not in card]
    if missing:
        raise BundleError(f"model card {path}: missing field(s) {', '.join(missing)}")
    _check_areas_field(card["areas"], path)
    if not (folder / WEIGHTS_NAME).is_file():
        raise BundleError(f"model bundle {folder}: {WEIGHTS_NAME} not found")
    return card


def _check_areas_field(areas: Any, path: Path) -> None:
    if not isinstance(areas, list) or not areas:
        raise BundleError(f"model card {path}: 'areas' must be a non-empty list")
    for i, row in enumerate(areas):
        if not isinstance(row, dict) or not {"area_id", "name"} <= set(row):
            raise BundleError(f"model card {path}: areas[{i}] needs 'area_id' and 'name', got {row!r}")


def card_areas(card: dict[str, Any]) -> list[tuple[int, str, str | None]]:
    """(area_id, name, colour) per output column of the bundle's classifier, in logit order."""
    return [(int(a["area_id"]), str(a["name"]), a.get("color")) for a in card["areas"]]


def _areas_of(areas: Any) -> tuple[list[tuple[int, str]], str]:
    """(id, name) pairs sorted by id and a name for messages, from a table path, a DataFrame or (id, name, ...)."""
    if isinstance(areas, (str, os.PathLike)):
        from cytonet.io.tables import load_areas

        table, where = load_areas(areas), f"the areas table {areas}"
    elif hasattr(areas, "itertuples"):
        table, where = areas, "the areas table"
    else:
        pairs = sorted((int(a[0]), str(a[1])) for a in areas)
        return pairs, "the given areas"
    return sorted((int(i), str(n)) for i, n in zip(table["area_id"], table["name"])), where


def _fmt(pairs: Sequence[tuple[int, str]]) -> str:
    return ", ".join(f"{i} {n}" for i, n in pairs)


def check_card(card: dict[str, Any], where: str | os.PathLike, *, pixel_size_um: float | None = None,
               areas: Any = None) -> None:
    """Refuse a bundle trained for other data: a different patch pixel size or other area ids/names.

    ``areas``: an areas table path, a DataFrame with area_id/name, or (id, name[, colour]) rows. The bundle must
    predict exactly these areas (ids and names); its own column order is what the maps follow.
    """
    if pixel_size_um is not None:
        um = float(card["pixel_size_um"])
        if abs(um / float(pixel_size_um) - 1) > PIXEL_SIZE_TOLERANCE:
            raise BundleError(f"model bundle {where} was trained on patches at {um:g} µm/px, not the "
                              f"{float(pixel_size_um):g} µm/px asked for (model card field 'pixel_size_um')")
    if areas is not None:
        mine = sorted((i, n) for i, n, _ in card_areas(card))
        theirs, src = _areas_of(areas)
        if mine != theirs:
            only_bundle = [p for p in mine if p not in theirs]
            only_table = [p for p in theirs if p not in mine]
            raise BundleError(
                f"model bundle {where} predicts the areas {_fmt(mine)} but {src} has {_fmt(theirs)} "
                f"(only in the bundle: {_fmt(only_bundle) or '-'}; only in the table: {_fmt(only_table) or '-'}); "
                "map with a bundle trained on these areas, or use the bundle's areas table")
