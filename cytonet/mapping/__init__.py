"""Mapping stages: whole-section inference (``cytonet infer``) and 3D smoothing of the maps (``cytonet smooth3d``)."""
