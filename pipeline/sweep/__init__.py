"""The sweep machinery: a spec (spec.py) becomes trials that Ray Tune runs (driver.py), each a
trainable (trainable.py, or data-parallel through Ray Train: distributed.py) logging to MLflow
(tracking.py); the driver reads the runs back into tables (results.py) and registers the best
model (registry.py). `python -m pipeline.sweep SPEC` runs one sweep."""
