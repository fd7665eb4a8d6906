"""Language models. Import torch; never import tracking, experiment or the CLI."""
