"""DVC experiments: compared, run with checked params, in studies; the stages' code dependencies."""
