"""Model bundles: a trained classifier as it travels from the lab that trained it to the labs that map with it.

A bundle is a folder (format ``cytonet-bundle/1``)::

    weights.safetensors   encoder + head tensors ("encoder.*", "head.*" of cytonet.nn.checkpoints.Classifier)
    model_card.json       areas, patch pixel size, window, normalisation, encoder spec, training data,
                          evaluation figures, code version (cytonet.io.model_card reads and checks it)

The weights are safetensors, never a pickle: loading a bundle cannot run code, whoever wrote it. A bundle is
written to a temporary folder beside its destination and renamed into place, so a killed export never leaves a
folder that looks like a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cytonet.io.atomic import file_sha256, json_clean, new_file_mode
from cytonet.io.model_card import (
    BUNDLE_FORMAT,
    CARD_NAME,
    WEIGHTS_NAME,
    BundleError,
    card_areas,
    check_card,
    read_card,
)
from cytonet.nn.checkpoints import Classifier
from cytonet.nn.models import build_encoder, prepare_model

__all__ = ["BUNDLE_FORMAT", "BundleError", "load_bundle", "save_bundle"]


def _write_folder(tmp: Path, model: Classifier, card: dict[str, Any]) -> None:
    """weights.safetensors, then model_card.json (with the weights' checksum) into ``tmp``, both fsynced."""
    from safetensors.torch import save_file

    # contiguous CPU copies: safetensors stores raw buffers and refuses views that share memory
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": BUNDLE_FORMAT})
    card = dict(card, format=BUNDLE_FORMAT, weights={"file": WEIGHTS_NAME, "sha256": file_sha256(tmp / WEIGHTS_NAME),
                                                      "tensors": len(tensors)})
    with open(tmp / CARD_NAME, "w") as fh:
        json.dump(json_clean(card), fh, indent=2)  # NaN (a missing figure) becomes null: JSON has no NaN
        fh.write("\n")
    for name in (WEIGHTS_NAME, CARD_NAME):
        os.chmod(tmp / name, new_file_mode())  # safetensors writes 0600; another lab must be able to read a bundle
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())


def save_bundle(model: Classifier, card: dict[str, Any], out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``model`` and its ``card`` as the bundle folder ``out`` (atomically); refuse to overwrite unless force."""
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"model bundle {out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_folder(tmp, model, card)
        read_card(tmp)  # never publish a card that load_bundle would refuse
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():  # force: a folder cannot replace a non-empty folder, so the old bundle moves aside first
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_weights(folder: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bundle's tensors, parsed as safetensors only (a pickle or any other file is refused, never run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise BundleError(f"model bundle {folder}: {WEIGHTS_NAME} not found")
    expected = (card.get("weights") or {}).get("sha256")
    if expected and file_sha256(path) != expected:
        raise BundleError(f"model bundle {folder}: {WEIGHTS_NAME} does not match the sha256 in {CARD_NAME} "
                          "(the file changed after export)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"model bundle {folder}: {WEIGHTS_NAME} is not a safetensors file ({exc}); "
                          "bundles never load pickles") from exc


def _build(folder: Path, card: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Classifier:
    spec = card["encoder"]
    try:
        encoder = build_encoder(spec["encoder"], spec["embedding_dim"], spec.get("proj_hidden"))
        model = Classifier(encoder, len(card["areas"]))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"model bundle {folder}: the weights do not fit the card's encoder {spec!r} and "
                          f"{len(card['areas'])} areas ({exc})") from exc
    return model


def load_bundle(path: str | os.PathLike, *, pixel_size_um: float | None = None, areas: Any = None,
                device: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """(classifier in eval mode, model card) of a bundle folder; refuses a card that does not fit the data.

    ``pixel_size_um``: the patch pixel size the caller expects (refused if the bundle's differs by > 1 %).
    ``areas``: an areas table path, DataFrame or (id, name[, colour]) rows that the bundle must predict exactly.
    """
    folder = Path(path)
    card = read_card(folder)
    check_card(card, folder, pixel_size_um=pixel_size_um, areas=areas)
    model = _build(folder, card, _read_weights(folder, card))
    return prepare_model(model, torch.device(device)).eval(), card


def bundle_checkpoint(model: Classifier, card: dict[str, Any]) -> tuple[Classifier, dict[str, Any]]:
    """(model, checkpoint-like dict) for ``cytonet.nn.checkpoints.predict``: the card's areas and input size."""
    areas = card_areas(card)
    return model, {"area_ids": [a[0] for a in areas], "area_names": [a[1] for a in areas],
                   "input_px": int(card["input_px"]), "patch_px": int(card["patch_px"]),
                   "pixel_size_um": float(card["pixel_size_um"])}
