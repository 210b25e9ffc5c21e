"""CytoNet demo brains: a realistic cortex phantom generator.

The phantom is a folded 3D cortical sheet (see ``geometry``) cut into sections.  Each area of the sheet has its
own lamination: layer I..VI thickness proportions from von Economo & Koskinas (1925), per-layer cell density and
cell-body size from BigBrain 1 µm cell segmentations (Amunts et al. 2013), mapped to von Economo areas through
the BigBrain surface atlas (Wagstyl et al. 2020); see ``reference``.  Cell bodies are rendered as a thinned
Poisson process of blurred impulses (``render``), the section is written as a scanner would (``tiff``), with its
ground truth, sparse annotations and exact pixel -> 3D transform (``demo``).  Brains differ in folding, stain,
shrinkage, noise, area borders and artifacts, so a model must generalise.  ``big`` writes a huge benchmark
section tile by tile.
"""

from __future__ import annotations

from .big import write_big_section
from .demo import generate_brain, generate_demo, layout, write_tables
from .params import DemoConfigError, DemoParams

__all__ = ["DemoConfigError", "DemoParams", "generate_brain", "generate_demo", "layout", "write_big_section",
           "write_tables"]
