"""Layer 0, files in and out (no torch): tables, readers, transforms, annotations, map writing, metrics, atomic
writes, config and params, code fingerprints and logging. Every stage builds on these."""
