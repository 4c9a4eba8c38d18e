"""pipeline: the thin glue between params.yaml, the `ddpm` library, DVC and MLflow.

One Typer command per DVC stage (``python -m pipeline <stage> --help``); each reads
its declared params, calls `ddpm`, and writes its outputs atomically.
"""
