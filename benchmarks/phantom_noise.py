"""How much measurement noise does the phantom's rendering add to a column's laminar profile?

BigBrain's between-vertex spread of the laminar profiles mixes real tissue variation with measurement noise. The
phantom draws tissue variation from that spread and then adds noise of its own when it renders cells, stain and
the scanner. So that the rendered columns vary as much as BigBrain's vertices, the phantom draws only the share
``1 - noise / BigBrain`` of the spread as tissue (``cytonet.synth.geometry.TISSUE_VARIANCE_SHARE``).

This script measures that share on sections of the known demo brains, rendered with the full spread: for the same
columns (``realism.column_profiles``), the profile of the rendered image and the profile the renderer intended.
Per brain, an affine map (rendered = a x intended + b) takes out the stain; the residual variance over a^2 is the
rendering's noise in BigBrain's darkness units, compared with BigBrain's mean within-area variance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import realism  # noqa: E402

from cytonet.synth import geometry  # noqa: E402
from cytonet.synth.demo import section_specs_one  # noqa: E402
from cytonet.synth.params import DemoParams  # noqa: E402
from cytonet.synth.reference import AREAS, shared_data_dir  # noqa: E402


def section_pair(p: DemoParams, brain: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(rendered, intended) column profiles of one section, the same columns in both."""
    r = section_specs_one(p, brain, index).renderer
    res = r.render_full()
    h, w = r.shape
    intended = np.zeros((h, w), np.float32)
    for y in range(0, h, 512):
        n = min(512, h - y)
        rows, cols = np.broadcast_arrays(np.arange(y, y + n, dtype=np.float32)[:, None],
                                         np.arange(w, dtype=np.float32)[None, :])
        lab = r.labels(rows, cols, (y, 0, n, w))
        intended[y:y + n] = 255.0 * (1.0 - r.darkness(lab))
    args = (res["layer"], res["area"], res["tissue"], p.pixel_size_um)
    return (realism.column_profiles(res["image"], *args)["profiles"],
            realism.column_profiles(intended, *args)["profiles"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=2, help="sections per known brain (every other one)")
    a = ap.parse_args(argv)
    shared = shared_data_dir()
    if shared is None:
        print("SKIP: ../shared/data absent: no BigBrain profiles to compare with")
        return 0
    geometry.TISSUE_VARIANCE_SHARE = 1.0  # measure with the full spread
    p = DemoParams()
    known = [b for b in p.brain_ids() if p.role(b) == "known"]
    noise = []
    for b in known:
        pairs = [section_pair(p, b, i) for i in range(0, 2 * a.sections, 2)]
        rend, want = np.vstack([x for x, _ in pairs]), np.vstack([y for _, y in pairs])
        slope, icpt = np.polyfit(want.ravel(), rend.ravel(), 1)
        resid = rend - (slope * want + icpt)
        noise.append(float(np.mean(resid.var(0))) / slope ** 2)
        print(f"{b}: {len(rend)} columns, rendered = {slope:.3f} x intended + {icpt:.3f}, "
              f"noise variance {noise[-1]:.2e} (BigBrain darkness units)")
    bb, _ = realism.load_bigbrain(shared / "bigbrain" / "bigbrain_profiles18_layers_areas.npz", [n for n, _ in AREAS])
    within = float(np.mean([bb.profiles[bb.area == n].var(0).mean() for n, _ in AREAS]))
    share = 1.0 - float(np.mean(noise)) / within
    print(f"BigBrain mean within-area variance per depth: {within:.2e}")
    print(f"rendering noise variance: {np.mean(noise):.2e} -> tissue share of the spread: {share:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
