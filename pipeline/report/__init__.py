"""Comparison reports from a sweep's results tables. `python -m pipeline.report` writes one report per
sweep listed in params.yaml.

params.py (the params.yaml section) -> analysis.py (read the tables, one summary row per trial) ->
paper.py (the paper's and the blog post's numbers beside ours), figures.py, tables.py, samples.py
(the best run's sampled frames), decoders.py (decoders at matched parameters) -> build.py
(build_report, the markdown and HTML pages, main). The best trial is pipeline.sweep.record.results' ranking.
"""
