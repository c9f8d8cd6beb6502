"""Command-line plumbing.

`stage`: the shared plumbing of the stage shells (`stages/*.py`): overrides, the typed config,
one-line errors and exit codes. `commands`: `python -m pipeline promote|sample|compare|
import-run|sync-run`, the operations outside the DAG."""
