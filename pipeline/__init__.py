"""pipeline: the glue between params.yaml, the ddpm library, DVC and MLflow."""
