"""params.yaml: one schema module per section, per-stage views (base), the whole file (schema)."""
