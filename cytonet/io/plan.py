"""Which stages a run plans, and why: the decision that ``workflow/rules/common.smk`` and ``cytonet validate`` share.

Three situations (``plan_stages``):

- ``model: BUNDLE`` is set (a bundle of ``cytonet export-model``): **map** the listed brains with it. mask, infer,
  (smooth3d), section metrics (for the sections with ground truth, the others get a ``no_ground_truth`` row) and
  aggregation; no patch store, pretraining, finetuning, evaluation or embedding. Adding a brain then costs its
  masks and maps only.
- no bundle and no annotated section of a known brain (no ``annotation`` in any known brain's sections table):
  **pretrain** only. mask, patches, pretrain, embed: pretraining needs no labels and the embedding shows what it
  learnt; nothing can be finetuned, so nothing is evaluated or mapped.
- otherwise **train**: the whole comparison (pretrain, finetune every model x seed, evaluate, embed, map).

``check_plan`` refuses the combinations that cannot work before any job starts, with a message that names the
config key and the file: a bundle folder that is missing or whose card is unreadable, a bundle whose areas are
not those of the areas table, and ``infer.models`` set in the config while no section is annotated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cytonet.io.annotations import is_set
from cytonet.io.model_card import PIXEL_SIZE_TOLERANCE, BundleError, check_card, read_card

# Every stage in the order the data flows; a plan is a subsequence. Names are the rules' (benchmarks_page: the
# benchmark figures of docs/benchmarks.md in the report, part of the full comparison).
STAGES = ("mask", "patches", "pretrain", "finetune", "evaluate", "embed", "infer", "smooth3d", "section_metrics",
          "aggregate", "benchmarks_page")
TRAINED_MODELS = ("cytonet", "random_init", "ablation")  # what the comparison finetunes (workflow/rules/finetune.smk)
BUNDLE_MAPS = "cytonet"  # the bundle's maps go where CytoNet's maps go (smooth3d, montages and metrics read them)


class PlanError(ValueError):
    """A configuration that cannot run on these tables; the message names the config key and the file."""


@dataclass(frozen=True)
class Plan:
    """The stages a run executes, the models it trains and maps with, and a one-line reason."""

    mode: str  # "train", "pretrain" or "map"
    stages: tuple[str, ...]
    reason: str
    train_models: tuple[str, ...] = ()
    map_models: tuple[str, ...] = ()
    bundle: str | None = None
    counts: dict[str, int] = field(default_factory=dict, compare=False)

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` (a name of STAGES) is planned."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return stage in self.stages

    def line(self) -> str:
        """The plan in one line, as the workflow logs it at start."""
        return f"plan: {' -> '.join(self.stages)} ({self.reason})"


def annotated_sections(sections: pd.DataFrame) -> pd.DataFrame:
    """The sections of known brains that have an annotation (the only labels training may use)."""
    if "annotation" not in sections or sections.empty:
        return sections.iloc[0:0]
    known = sections["role"] == "known"
    return sections[known & sections["annotation"].map(is_set)]


def _ordered(names: set[str]) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in names)


def _counts(sections: pd.DataFrame) -> dict[str, int]:
    labelled = annotated_sections(sections)
    return {"brains": int(sections["brain_id"].nunique()), "sections": int(len(sections)),
            "annotated": int(len(labelled)), "annotated_brains": int(labelled["brain_id"].nunique())}


def plan_stages(config: dict[str, Any], sections: pd.DataFrame) -> Plan:
    """The plan of a validated ``config`` on ``sections`` (one row per section: brain_id, role, annotation)."""
    n = _counts(sections)
    smooth = {"smooth3d"} if config["smooth3d"]["enabled"] else set()
    bundle = config.get("model")
    if bundle:
        reason = (f"model: {bundle} is set, so the {n['brains']} brain(s) and {n['sections']} section(s) of the "
                  "brains table are mapped with the bundle; nothing is trained")
        return Plan("map", _ordered({"mask", "infer", "section_metrics", "aggregate"} | smooth), reason,
                    map_models=(BUNDLE_MAPS,), bundle=str(bundle), counts=n)
    if n["annotated"] == 0:
        reason = ("no section of a known brain has an annotation (sections table column 'annotation'), so there is "
                  "nothing to finetune: pretraining and the embedding only, no classifier, evaluation or maps "
                  "(annotate sections of a known brain, or set model: BUNDLE to map with a trained model)")
        return Plan("pretrain", _ordered({"mask", "patches", "pretrain", "embed"}), reason, counts=n)
    models = tuple(config["infer"]["models"])
    reason = (f"{n['annotated']} annotated section(s) in {n['annotated_brains']} known brain(s): pretrain, finetune "
              f"{len(TRAINED_MODELS)} models x {len(config['evaluate']['seeds'])} seed(s), evaluate, embed, and map "
              f"{n['sections']} section(s) with {', '.join(models)}")
    return Plan("train", _ordered(set(STAGES) - {"smooth3d"} | smooth), reason, train_models=TRAINED_MODELS,
                map_models=models, counts=n)


def _coarser_sections(card: dict[str, Any], sections: pd.DataFrame | None) -> list[str]:
    """brain/section of every section whose table pixel size is coarser than the bundle reads (no upsampling)."""
    if sections is None or "pixel_size_um" not in sections:
        return []
    um = pd.to_numeric(sections["pixel_size_um"], errors="coerce")
    # NaN (size from the image metadata) is not known yet and passes
    coarse = sections[um > float(card["pixel_size_um"]) * (1 + PIXEL_SIZE_TOLERANCE)]
    return [f"{b}/{s} ({u:g} µm/px)" for b, s, u in zip(coarse["brain_id"], coarse["section_id"],
                                                        um[coarse.index])]


def _check_bundle(plan: Plan, areas: str | os.PathLike | None, sections: pd.DataFrame | None) -> None:
    try:
        card = read_card(plan.bundle)
        if areas is not None and Path(areas).is_file():
            check_card(card, plan.bundle, areas=areas)
    except BundleError as exc:
        raise PlanError(f"config key 'model': {exc}") from exc
    coarse = _coarser_sections(card, sections)
    if coarse:
        shown = ", ".join(coarse[:5]) + (f" and {len(coarse) - 5} more" if len(coarse) > 5 else "")
        raise PlanError(f"config key 'model': model bundle {plan.bundle} reads sections at "
                        f"{float(card['pixel_size_um']):g} µm/px, but the sections tables give coarser images: "
                        f"{shown} (inference cannot upsample; map them with a bundle trained at their resolution)")


def check_plan(plan: Plan, config: dict[str, Any], *, areas: str | os.PathLike | None = None,
               user_config: dict[str, Any] | None = None, sections: pd.DataFrame | None = None) -> None:
    """Raise PlanError for a plan that cannot run: a bad bundle, areas that differ from the bundle's, sections
    coarser than the bundle reads, or maps asked for (``infer.models`` in ``user_config``, the config as written
    before defaults) that nothing can train.

    ``areas``: the areas table to check a bundle against (skipped while it does not exist yet: the demo's is
    written by its first job, and ``cytonet infer`` checks it again). ``sections``: the planned sections, whose
    ``pixel_size_um`` (where the table gives one) must not be coarser than the bundle's.
    """
    if plan.mode == "map":
        _check_bundle(plan, areas, sections)
    asked = ((user_config or {}).get("infer") or {}).get("models")
    if plan.mode == "pretrain" and asked:
        raise PlanError(f"config key 'infer.models' asks for maps of {', '.join(asked)}, but no section of a known "
                        "brain is annotated (sections table column 'annotation'), so no classifier can be trained: "
                        "annotate sections, set model: BUNDLE to map with a trained model, or remove infer.models "
                        "to pretrain and embed only")


def describe(plan: Plan) -> list[str]:
    """The lines ``cytonet validate`` prints about the plan: the stages, and why."""
    lines = [f"plan ({plan.mode}): {' -> '.join(plan.stages)}", f"  why: {plan.reason}"]
    if plan.train_models:
        lines.append(f"  trains: {', '.join(plan.train_models)}")
    if plan.map_models:
        lines.append(f"  maps with: {plan.bundle or ', '.join(plan.map_models)}"
                     + (f" (maps in <results>/maps/{plan.map_models[0]}/)" if plan.bundle else ""))
    return lines
