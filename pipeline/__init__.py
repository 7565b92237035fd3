"""Object-centric unsupervised semantic segmentation pipeline (after COMUS)."""
