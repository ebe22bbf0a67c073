"""The pipeline beside DVC: its graph read from dvc.yaml (graph.py), stage instances run in-process and cached
in a content-addressed store (runner.py, store.py), the Prefect flow on them (pipeline.py), its serving and
set-up (serve.py, setup.py), and the explicit exchange with a DVC workspace (exchange.py)."""
