"""The sweep machinery. `python -m pipeline.sweep SPEC [--profile P]` runs one sweep.

- The spec: spec.py (load_spec, SweepSpec, Sweep) from settings.py (the run/asha/overfit sections),
  grid.py (the points of the grid), validate.py (every field checked, the field named) and profiles.py.
- The driver: driver.py (run_sweep, main) with placement.py (resources, the cluster's nodes),
  data_check.py (the data folder fits the spec), identity.py (the sweep id: spec, data and the code
  a trial imports), runs.py (one MLflow run per point) and callbacks.py (Tune's hooks).
- A trial: trial.py (TrialConfig, a dict only at the Ray boundary) runs as trainable.py, or as
  distributed.py (data-parallel through Ray Train), logging through tracking.py and pictures.py;
  faults.py holds the tests' fault injection.
- After it: results.py (the tables read back from MLflow, and the one ranking of trials) and
  registry.py (the best trial's model).
"""
