"""Thin command-line stages, one per DVC stage, around the moder library (dvc.yaml runs them)."""
