"""The bottom layer: errors, validated params, the on-disk layout, typed stage records,
file helpers and MLflow run tracking. Imports nothing else from `pipeline`."""
