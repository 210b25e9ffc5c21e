# Shared planning: which brains and sections exist, where their images are.
import json
import os

import pandas as pd

from cytonet.io.fingerprint import fingerprint
from cytonet.io.tables import load_all_sections

wildcard_constraints:
    brain="[A-Za-z0-9_-]+",
    section="[A-Za-z0-9_-]+",


# The generator's own parameters: the demo section without the workflow's `enabled` switch.
DEMO_PARAMS = {k: v for k, v in config["demo"].items() if k != "enabled"}


def _plan_sections() -> pd.DataFrame:
    """One row per section: brain_id, section_id, role, image, pixel_size_um (NaN when the metadata has it)."""
    if config["demo"]["enabled"]:
        # The demo brains do not exist before their rule runs, so plan from the generator's layout.
        from cytonet.synth import DemoParams, layout

        out = config["demo"]["out_dir"]
        role = DemoParams.from_cfg(DEMO_PARAMS).role
        rows = [
            {"brain_id": b, "section_id": s, "role": role(b), "image": f"{out}/{b}/images/{s}.ome.tif",
             "pixel_size_um": float("nan")}
            for b, sections in layout(DEMO_PARAMS).items()
            for s in sections
        ]
        return pd.DataFrame(rows)
    # Real data: validate every table now, so a missing image or a duplicate id stops the run before any job.
    return load_all_sections(config["brains"], check_files=True, section_thickness_um=config["section_thickness_um"])


SECTIONS = _plan_sections()
BRAINS = sorted(SECTIONS.brain_id.unique())


def sections_of(brain: str) -> list[str]:
    return SECTIONS.loc[SECTIONS.brain_id == brain, "section_id"].tolist()


def section_row(wildcards):
    row = SECTIONS[(SECTIONS.brain_id == wildcards.brain) & (SECTIONS.section_id == wildcards.section)]
    if row.empty:
        raise ValueError(f"unknown section '{wildcards.section}' of brain '{wildcards.brain}'")
    return row.iloc[0]


def section_image(wildcards) -> str:
    return section_row(wildcards).image


def pixel_size_option(wildcards) -> str:
    """`--pixel-size UM` from the sections table, or nothing when the image metadata carries it."""
    value = section_row(wildcards).pixel_size_um
    return "" if pd.isna(value) else f"--pixel-size {float(value)}"


def as_json(section: dict) -> str:
    """A config section as one shell-quoted JSON argument (params: so that changes trigger reruns)."""
    return "'" + json.dumps(section, sort_keys=True) + "'"


def brains_table() -> str:
    return f"{config['demo']['out_dir']}/brains.csv" if config["demo"]["enabled"] else config["brains"]


def areas_table() -> str:
    return f"{config['demo']['out_dir']}/areas.csv" if config["demo"]["enabled"] else config["areas"]
