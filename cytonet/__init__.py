"""CytoNet: map cytoarchitectonic areas in whole histological sections of human brains."""

__version__ = "0.1.0"
