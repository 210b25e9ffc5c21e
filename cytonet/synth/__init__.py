"""CytoNet demo brains: a cortex phantom generator calibrated against real cortex.

The phantom is a folded 3D cortical sheet (see ``geometry``) cut into sections: irregular gyri and sulci, area
borders with a transition zone, layers that follow Bok's equivolumetric principle (deep layers thicker under
gyral crowns, superficial ones in fundi).  Each cortical column shows a laminar stain profile drawn from BigBrain
(Wagstyl et al. 2020): the area's mean profile, this brain's offset (BigBrain's between-hemisphere spread) and the
column's variation (BigBrain's full within-area covariance); layer boundaries are von Economo & Koskinas's (1925),
varied per column by BigBrain's spread; cell sizes come from BigBrain 1 µm cell segmentations (Amunts et al.
2013).  OC draws IVa / a cell-poor stria of Gennari (IVb) / IVc, FA giant Betz cells in layer Vb; radial cell
columns, radial vessels and round lumina, and textured white matter with glia (see ``reference``, ``render``).
Cell bodies are rendered as a thinned Poisson process of blurred impulses, the section is written as a scanner
would (``tiff``), with its ground truth, sparse annotations and exact pixel -> 3D transform (``demo``).  Brains
differ in folding, stain, shrinkage, noise, area borders and artifacts, so a model must generalise.  ``big``
writes a huge benchmark section tile by tile.
"""

from __future__ import annotations

from .big import write_big_section
from .demo import generate_brain, generate_demo, layout, write_tables
from .params import DemoConfigError, DemoParams

__all__ = ["DemoConfigError", "DemoParams", "generate_brain", "generate_demo", "layout", "write_big_section",
           "write_tables"]
