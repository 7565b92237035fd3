"""Object-centric unsupervised semantic segmentation pipeline (after COMUS)."""
from pipeline import faiss_runtime  # noqa: F401  (must load before torch: see its docstring)
