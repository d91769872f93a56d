"""Model sources: where a model's files are, which encoder of it a scan reads, and their identities."""
