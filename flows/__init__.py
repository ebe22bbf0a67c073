"""The pipeline on Prefect: the flow (pipeline.py), the content-addressed store it shares with
`dvc repro` (store.py, calls.py), serving (serve.py) and set-up (setup.py)."""
