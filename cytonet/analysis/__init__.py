"""Analysis stages: patch evaluation against baselines, section metrics, aggregated tables and montages, and the
embedding (UMAP) analysis."""
