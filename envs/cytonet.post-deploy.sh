#!/usr/bin/env bash
# Snakemake runs this once after creating the environment of cytonet.yaml (--software-deployment-method conda),
# with that environment active and the working directory Snakemake's own: the repository root, where the
# workflow is run from (its configfile and docs/ inputs are relative to it too). It installs the cytonet package
# editable, so the environment runs the code of this checkout, the same code that the rules' fingerprints hash.
set -euo pipefail
if [[ ! -f pyproject.toml ]] || ! grep -q '^name = "cytonet"' pyproject.toml; then
    echo "cytonet.post-deploy.sh: run snakemake from the cytonet repository root (working directory: $PWD)" >&2
    exit 1
fi
python -m pip install -e .
