"""Exchange with QuPath: annotations in, area maps out (``cytonet annotation-to-labels``, ``cytonet map-to-geojson``).

Both commands are thin: the geometry (label grid <-> GeoJSON polygons in QuPath's pixel-corner convention) lives in
:mod:`cytonet.io.geojson`, the reading of annotations in :mod:`cytonet.io.annotations`.
"""
