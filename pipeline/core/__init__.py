"""The bottom layer; imports nothing else from `pipeline`.

`config`: validated params (`params.yaml` and overrides). `errors`: the errors a user can fix.
`files`: hashing and atomic writes. `layout`: where every stage reads and writes. `records`:
the typed JSON records stages hand each other. `tracking`: MLflow runs (start, log, end).
`provenance`: where a run comes from, as tags. `progress`: progress bars that suit a terminal
and a log file. `connect`: joining a Ray cluster as the driver (of training, of prepare's
tasks)."""
