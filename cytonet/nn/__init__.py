"""Layer 1, the torch pieces the training, mapping and analysis stages share: encoders, classifier and checkpoint
files, patch datasets and samplers, distributed set-up. Knows nothing of Dask or Snakemake."""
