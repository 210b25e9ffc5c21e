"""How much does the demo phantom behave like real cortex? Laminar-profile separability, BigBrain vs demo.

    .venv/bin/python benchmarks/bench_phantom_realism.py [--demo-dir resources/demo] [--out FILE]

Real cortex: BigBrain 18-depth staining profiles (``../shared/data/bigbrain/bigbrain_profiles18_layers_areas.npz``)
of the six demo areas by von Economo name, outside-tissue vertices dropped, as darkness 1 - value/65535; a linear
classifier (standardised features, logistic regression, balanced classes) is trained on the left hemisphere and
tested on the right. Demo: one 18-bin depth profile per ~0.5 mm cortical column of every demo section (see
``realism.column_profiles``), trained on the known brains and tested on the unknown one. Both report the
6-area macro-F1 (profiles; profiles + the six layer thicknesses) and the AUC of every area pair (profiles).

Targets (issue "Demo brains calibrated against real cortex"): the Spearman rank correlation of the 15 pair
AUCs >= 0.6, and the demo's profile macro-F1 within [BigBrain, BigBrain + 0.2]. Without ``--demo-dir`` a small
demo is generated into a temporary folder. Exits 0 with a message when ``../shared/data`` is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import realism  # noqa: E402  (the helpers beside this script)

RANK_TARGET = 0.6
F1_BAND = 0.2
#: a small demo for runs without --demo-dir (4 brains x 3 sections at 12 µm/px)
SMALL_DEMO = dict(n_brains=4, n_unknown=1, sections_per_brain=3, annotate_every=2, pixel_size_um=12.0,
                  size_mm=22.0, seed=0)


def shared_data() -> Path:
    env = os.environ.get("CYTONET_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def demo_areas(demo_dir: Path) -> list[str]:
    """Area names of the demo (``areas.csv``, in id order); they are von Economo names."""
    from cytonet.synth.reference import AREAS

    names = realism.load_demo_names(demo_dir)
    known = [a for a, _ in AREAS]
    if sorted(names) != sorted(known):
        print(f"note: demo areas {names} differ from cytonet.synth.reference.AREAS {known}")
    return names


def evaluate(s: realism.Samples, train: str, test: str, areas: list[str]) -> dict:
    """Macro-F1 (profiles; + thicknesses) and pair AUCs, trained on group ``train``, tested on ``test``."""
    tr, te = s.select(s.group == train), s.select(s.group == test)
    counts = {g: {a: int(((s.group == g) & (s.area == a)).sum()) for a in areas} for g in (train, test)}
    return dict(counts=counts,
                macro_f1_profiles=realism.macro_f1(tr, te, areas, with_thickness=False),
                macro_f1_profiles_thickness=realism.macro_f1(tr, te, areas, with_thickness=True),
                pair_auc=realism.all_pair_aucs(tr, te, areas))


def run_bigbrain(npz: Path, areas: list[str], max_per: int) -> dict:
    s, index = realism.load_bigbrain(npz, areas)
    print("BigBrain economo mapping (demo area -> economo index/name):",
          ", ".join(f"{a}->{i}" for a, i in index.items()))
    s = realism.subsample(s, max_per)
    return dict(mapping=index, **evaluate(s, "L", "R", areas))


def run_demo(demo_dir: Path, areas: list[str], max_per: int, column_mm: float) -> dict:
    s, names, per_section = realism.load_demo(demo_dir, column_mm)
    cov = [v["coverage"] for v in per_section.values()]
    print(f"demo: {len(per_section)} sections, {len(s.area)} columns of {column_mm} mm "
          f"(columns with every depth bin filled cover {np.mean(cov):.0%} of cortex pixels)")
    s = realism.subsample(s, max_per)
    return dict(area_ids=names, sections=per_section, column_mm=column_mm, **evaluate(s, "known", "unknown", areas))


def verdicts(bb: dict, demo: dict) -> dict:
    """The two targets of the issue, plus the thickness variant of the F1 band for information."""
    from scipy.stats import spearmanr

    pairs = list(bb["pair_auc"])
    rho = float(spearmanr([bb["pair_auc"][p] for p in pairs], [demo["pair_auc"][p] for p in pairs]).statistic)
    lo, f1 = bb["macro_f1_profiles"], demo["macro_f1_profiles"]
    lo_t, f1_t = bb["macro_f1_profiles_thickness"], demo["macro_f1_profiles_thickness"]
    return dict(rank_correlation=rho, rank_target=RANK_TARGET, rank_pass=bool(rho >= RANK_TARGET),
                f1_band=[lo, lo + F1_BAND], f1_pass=bool(lo <= f1 <= lo + F1_BAND),
                f1_thickness_band=[lo_t, lo_t + F1_BAND], f1_thickness_in_band=bool(lo_t <= f1_t <= lo_t + F1_BAND))


def report(bb: dict, demo: dict, v: dict) -> None:
    print("\n| pair | BigBrain AUC | demo AUC |\n|---|---|---|")
    for p in bb["pair_auc"]:
        print(f"| {p} | {bb['pair_auc'][p]:.3f} | {demo['pair_auc'][p]:.3f} |")
    print(f"\nSpearman rank correlation of the pair AUCs: {v['rank_correlation']:.3f}")
    print("\n| 6-area macro-F1 | BigBrain (L -> R) | demo (known -> unknown) |\n|---|---|---|")
    for key, label in (("macro_f1_profiles", "profiles"), ("macro_f1_profiles_thickness", "profiles + thicknesses")):
        print(f"| {label} | {bb[key]:.3f} | {demo[key]:.3f} |")
    for name, r in (("BigBrain", bb), ("demo", demo)):
        print(f"samples {name}: " + "; ".join(f"{g}: " + ", ".join(f"{a} {n}" for a, n in c.items())
                                              for g, c in r["counts"].items()))
    ok = {True: "PASS", False: "FAIL"}
    lo, hi = v["f1_band"]
    print(f"\nTarget: rank correlation of pair AUCs >= {RANK_TARGET}: {v['rank_correlation']:.3f} "
          f"-> {ok[v['rank_pass']]}")
    print(f"Target: demo profile macro-F1 in [{lo:.3f}, {hi:.3f}] (BigBrain, BigBrain + {F1_BAND}): "
          f"{demo['macro_f1_profiles']:.3f} -> {ok[v['f1_pass']]}")
    lo, hi = v["f1_thickness_band"]
    print(f"(info) demo profile+thickness macro-F1 in [{lo:.3f}, {hi:.3f}]: "
          f"{demo['macro_f1_profiles_thickness']:.3f} -> {'inside' if v['f1_thickness_in_band'] else 'outside'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, help="an existing demo (default: generate a small one in a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "phantom_realism.json")
    ap.add_argument("--column-mm", type=float, default=0.5, help="side of the pial tiles that define a column")
    ap.add_argument("--max-per-area", type=int, default=4000,
                    help="at most this many samples per area and train/test side (random, seed 0)")
    a = ap.parse_args(argv)
    npz = shared_data() / "bigbrain" / "bigbrain_profiles18_layers_areas.npz"
    if not npz.exists():
        print(f"SKIP: real reference data not found ({npz}); set CYTONET_SHARED_DATA to the shared data folder")
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cytonet-realism-") as tmp:
        demo_dir = a.demo_dir
        if demo_dir is None:
            from cytonet.synth import generate_demo

            demo_dir = Path(tmp) / "demo"
            print(f"generating a small demo {SMALL_DEMO} into {demo_dir}")
            generate_demo(SMALL_DEMO, demo_dir)
        areas = demo_areas(demo_dir)
        bb = run_bigbrain(npz, areas, a.max_per_area)
        demo = run_demo(demo_dir, areas, a.max_per_area, a.column_mm)
    v = verdicts(bb, demo)
    report(bb, demo, v)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.now(UTC).isoformat(timespec="seconds"), machine=platform.machine(),
                cpus=os.cpu_count(), wall_s=round(wall, 2), demo_dir=str(a.demo_dir or "generated (temporary)"),
                bigbrain=str(npz), max_per_area=a.max_per_area)
    a.out.write_text(json.dumps(dict(meta=meta, bigbrain=bb, demo=demo, targets=v), indent=2, default=str))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
