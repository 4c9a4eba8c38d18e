"""Experiments and studies: DVC experiments compared, run in studies, and the pipeline's own dependencies."""
