"""Comparison reports from a sweep's results tables: analysis, figures, tables, and the markdown and
HTML pages. `python -m pipeline.report` writes one report per sweep listed in params.yaml."""
