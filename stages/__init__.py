"""Pipeline stages, one module each; each exposes `Params`, `VERSION`, `key_params(cfg)` and `run(ctx, params)`."""
import pipeline  # noqa: F401  (loads faiss before a stage imports torch: see pipeline/faiss_runtime.py)
