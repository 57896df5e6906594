"""A run's config: its schema, loading it from presets, files and overrides, every rule it
must satisfy (`validate`), what may change on resume (`resume`), what its layout costs
(`plan`), and redacting its credentials."""
