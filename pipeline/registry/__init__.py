"""The MLflow model registry side.

`register`: the `register` stage. `package` and `generator_pyfunc`: the generator as an MLflow
models-from-code pyfunc. `tags`: what a version carries. `promote`: moving `champion` only to
a better version. `sampling`: images from a logged or registered generator. `compare`: runs
side by side. `import_run`: a training run's outputs back from MLflow."""
