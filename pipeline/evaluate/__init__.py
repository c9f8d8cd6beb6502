"""The `classifier` and `evaluate` stages.

`classifier`: train the domain classifier (the FID feature extractor of labelled data).
`evaluate`: the evaluate stage, FID/KID against the train split beside the real-vs-real
floor, class coverage and sample grids. `mlflow_log`: what evaluate adds to the training's
MLflow run. The metrics themselves live in `pipeline.metrics`."""
