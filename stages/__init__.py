"""Pipeline stages, one module each; each exposes `Params`, `VERSION`, `key_params(cfg)` and `run(ctx, params)`."""
