"""Command-line plumbing: the stage shells (`stages/*.py`) and `python -m pipeline ...`
operations outside the DAG."""
