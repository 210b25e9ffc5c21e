"""Stages on the CPU that never import torch: tissue masks (``cytonet mask``) and patch stores
(``cytonet patches``), with the Dask cluster they run on."""
