"""``cytonet export-model``: a trained classifier of a workflow run as a model bundle that other labs map with.

Pretraining on many brains costs days of GPU time; a lab does it once and hands the result on. The bundle
(``cytonet.nn.bundle``) holds the encoder and head tensors of ``RESULTS_DIR/finetune/<model>/seed<k>/classifier.pt``
as safetensors plus a model card that says what the model is for and where it came from:

- the areas (id, name, colour) in the classifier's output order, the patch pixel size, the window
  (``patch_px`` cut, resized to ``input_px``), the input normalisation and the encoder spec: what mapping needs;
- the training data: per brain the patches and annotated sections of its store (``RESULTS_DIR/patches``), whether
  pretraining (``RESULTS_DIR/pretrain/config.json``) and finetuning (the classifier's ``split.json``) used it,
  and the finetuning recipe and last epoch; the training specs of ``RESULTS_DIR/training`` when present;
- the evaluation figures (``RESULTS_DIR/evaluation/summary.csv``) when the run evaluated its models;
- the code version: the package version and ``git describe`` of the checkout, when it is one.

Then ``cytonet infer --model BUNDLE`` or the workflow's ``model: BUNDLE`` map new brains without any training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cytonet.cli import package_version
from cytonet.io.model_card import BUNDLE_FORMAT, BundleError
from cytonet.io.plan import TRAINED_MODELS
from cytonet.io.tables import TableError, load_areas, load_brains
from cytonet.nn.bundle import save_bundle
from cytonet.nn.checkpoints import load_classifier
from cytonet.nn.models import PIXEL_MEAN, PIXEL_STD


class ExportError(ValueError):
    """A run folder that holds no exportable classifier, or an areas/brains table that does not fit it."""


def classifier_path(results_dir: str | Path, model: str = "cytonet", seed: int = 0) -> Path:
    """Where the workflow writes the classifier of ``model`` and ``seed``."""
    return Path(results_dir) / "finetune" / model / f"seed{seed}" / "classifier.pt"


def card_areas(ck: dict[str, Any], areas: str | Path | None) -> list[dict[str, Any]]:
    """area_id, name, colour per classifier output; colours (and a name check) from the areas table if given."""
    ids = [int(a) for a in ck["area_ids"]]
    names = [str(n) for n in (ck.get("area_names") or ids)]
    if areas is None:
        import matplotlib

        colours = [matplotlib.colors.to_hex(matplotlib.colormaps["tab10"](k % 10)) for k in range(len(ids))]
        return [{"area_id": i, "name": n, "color": c} for i, n, c in zip(ids, names, colours)]
    table = load_areas(areas)
    rows = {int(r.area_id): r for r in table.itertuples()}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ExportError(f"areas table {areas} has no row for the classifier's area id(s) {missing}")
    renamed = [f"{i} ({n} vs {rows[i].name})" for i, n in zip(ids, names) if n != str(i) and n != rows[i].name]
    if renamed:
        raise ExportError(f"areas table {areas} names the classifier's areas differently: {', '.join(renamed)}")
    return [{"area_id": i, "name": str(rows[i].name), "color": str(rows[i].color)} for i in ids]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable JSON ({exc})") from exc


def _brain_rows(results: Path, finetune_sections: set[str], pretrain_brains: set[str],
                roles: dict[str, str]) -> list[dict[str, Any]]:
    """One row per patch store of the run: role, sections, patches, annotated sections, which training used it."""
    rows = []
    for manifest_path in sorted((results / "patches").glob("*/manifest.json")):
        manifest = _read_json(manifest_path)
        table = pd.read_parquet(manifest_path.parent / "patches.parquet", columns=["section", "area_id", "labelled"])
        brain = str(manifest.get("brain") or manifest_path.parent.name)
        used = sorted(set(table["section"]) & finetune_sections)
        rows.append({
            "brain_id": brain,
            # without a brains table: a brain whose labels trained the classifier was known, the others were not
            "role": roles.get(brain) or ("known" if used else "unknown"),
            "sections": len(manifest.get("sections") or table["section"].unique()),
            "patches": int(len(table)),
            "labelled_patches": int((table["area_id"] > 0).sum()),
            "annotated_sections": sorted(table.loc[table["labelled"], "section"].unique().tolist()),
            "pretrain": brain in pretrain_brains,
            "finetune_sections": used,
        })
    return rows


def training_summary(results: Path, ck_dir: Path, ck: dict[str, Any], model: str,
                     brains: str | Path | None) -> dict[str, Any]:
    """The card's ``training`` field: brains and their data, the finetuning recipe, the training specs."""
    split = _read_json(ck_dir / "split.json") or {}
    pretrain = _read_json(results / "pretrain" / "config.json") or {}
    pretrain_brains = {Path(s).name for s in pretrain.get("stores", [])} if ck.get("encoder_checkpoint") else set()
    roles: dict[str, str] = {}
    if brains is not None:
        roles = {str(r.brain_id): str(r.role) for r in load_brains(brains, check_files=False).itertuples()}
    sections = set(split.get("train_sections", [])) | set(split.get("val_sections", []))
    history = ck.get("history") or []
    specs = {stage: _read_json(results / "training" / f"{stage}.json") for stage in ("pretrain", f"finetune_{model}")}
    return {
        "role_source": "brains table" if brains is not None else "finetune split (known = its labels trained)",
        "brains": _brain_rows(results, sections, pretrain_brains, roles),
        "pretrain": {"encoder_checkpoint": ck.get("encoder_checkpoint"), "config": pretrain.get("config"),
                     "world_size": pretrain.get("world_size")} if ck.get("encoder_checkpoint") else None,
        "finetune": {"train_sections": split.get("train_sections", []), "val_sections": split.get("val_sections", []),
                     "n_train": split.get("n_train"), "n_val": split.get("n_val"), "config": ck.get("config"),
                     "epochs": len(history), "last_epoch": history[-1] if history else None},
        "training_specs": {k: v for k, v in specs.items() if v is not None},
    }


def evaluation_figures(results: Path) -> list[dict[str, Any]] | None:
    """The rows of the run's evaluation summary (known vs unknown brains per model), or None if not evaluated."""
    path = results / "evaluation" / "summary.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path).to_dict(orient="records")


def code_version() -> dict[str, Any]:
    """``cytonet --version`` and, when the package sits in a git checkout, ``git describe --always --dirty --tags``."""
    git = None
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10, check=False)
        git = (proc.stdout.strip() or None) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cytonet": package_version(), "git": git}


def build_card(results: Path, ck_path: Path, ck: dict[str, Any], *, model: str, seed: int,
               areas: str | Path | None, brains: str | Path | None) -> dict[str, Any]:
    """The model card of the classifier ``ck`` (read from ``ck_path`` in the run folder ``results``)."""
    patch_px = int(ck.get("patch_px") or ck["input_px"])
    input_px = int(ck.get("input_px") or patch_px)
    if not ck.get("pixel_size_um"):
        raise ExportError(f"classifier checkpoint {ck_path} has no 'pixel_size_um': the bundle could not say "
                          "at which resolution to read the sections")
    um = float(ck["pixel_size_um"])
    return {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "seed": seed,
        "source": str(ck_path),
        "areas": card_areas(ck, areas),
        "pixel_size_um": um,  # the patches' resolution: sections are read at it
        "patch_px": patch_px,
        "input_px": input_px,
        "window_px": input_px,  # the network's window; it sees um * patch_px / input_px µm/px
        "network_pixel_size_um": um * patch_px / input_px,
        "normalisation": {"input": "uint8 grey value / 255", "mean": PIXEL_MEAN, "std": PIXEL_STD},
        "encoder": dict(ck["spec"]),
        "training": training_summary(results, ck_path.parent, ck, model, brains),
        "evaluation": evaluation_figures(results),
        "code": code_version(),
    }


def export_model(results_dir: str | Path, out: str | Path, *, model: str = "cytonet", seed: int = 0,
                 areas: str | Path | None = None, brains: str | Path | None = None, force: bool = False) -> Path:
    """Write the bundle of ``RESULTS_DIR/finetune/<model>/seed<seed>/classifier.pt`` to the folder ``out``."""
    results = Path(results_dir)
    ck_path = classifier_path(results, model, seed)
    if not ck_path.is_file():
        trained = sorted(str(p.relative_to(results)) for p in results.glob("finetune/*/seed*/classifier.pt"))
        raise ExportError(f"no classifier {ck_path} (trained in this folder: {', '.join(trained) or 'none'}); "
                          "pick --model/--seed or point at the workflow's results folder")
    classifier, ck = load_classifier(ck_path)
    card = build_card(results, ck_path, ck, model=model, seed=seed, areas=areas, brains=brains)
    return save_bundle(classifier, card, out, force=force)


# ------------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet export-model``."""
    parser.add_argument("results", metavar="RESULTS_DIR", help="the workflow's results folder (config `results`)")
    parser.add_argument("-o", "--out", required=True, metavar="BUNDLE", help="bundle folder to write")
    parser.add_argument("--model", default="cytonet", choices=TRAINED_MODELS,
                        help="which trained model (default cytonet)")
    parser.add_argument("--seed", type=int, default=0, help="which finetuning seed (default 0)")
    parser.add_argument("--areas", help="areas table: the colours (and a check of the names) of the card's areas")
    parser.add_argument("--brains", help="brains table: the roles of the training brains on the card")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet export-model``."""
    try:
        out = export_model(args.results, args.out, model=args.model, seed=args.seed, areas=args.areas,
                           brains=args.brains, force=args.force)
    except (ExportError, BundleError, TableError) as exc:
        print(f"cytonet export-model: error: {exc}", file=sys.stderr)
        return 2
    card = json.loads((out / "model_card.json").read_text())
    brains = card["training"]["brains"]
    finetuned = sum(1 for b in brains if b["finetune_sections"])
    pretrained = sum(1 for b in brains if b["pretrain"])
    print(f"{out}: {card['model']} seed {card['seed']}, {len(card['areas'])} areas, {card['pixel_size_um']:g} µm/px, "
          f"{card['encoder']['encoder']} encoder, finetuned on {finetuned} brain(s), pretrained on {pretrained}")
    return 0
