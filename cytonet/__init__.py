"""CytoNet: map cytoarchitectonic areas in whole histological sections of human brains."""

# The package's only version string: pyproject.toml reads it (dynamic version), `cytonet --version` prints it.
__version__ = "0.1.0"
