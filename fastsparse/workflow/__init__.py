"""The application: run configuration, training, the study, the CLI, benchmarks, data, models."""
