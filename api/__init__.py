"""HTTP API of the LR-finder service (FastAPI); never imports torch."""
