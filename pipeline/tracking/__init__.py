"""MLflow: the client, train's live run, system metrics, the log stage's runs and registry, the outbox."""
