"""The trials wing: how Ray Tune runs one trial, and the Tune-side pieces around it.

trial.py (TrialConfig: what a trial is given, a dict only at the Ray boundary), trainable.py (the
trial itself), distributed.py (a data-parallel trial over Ray Train), search.py (the searcher and
scheduler), searched_runs.py (a searched trial's MLflow run, made as it starts), callbacks.py (Tune's
driver-side hooks) and faults.py (the tests' fault injection).

May import: the spec and record wings, vpn/ and pipeline's top-level modules.
"""
