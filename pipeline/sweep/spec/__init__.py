"""The spec wing: what a sweep is. A YAML spec read into typed values, checked before Ray starts.

sweep.py (load_spec, SweepSpec, Sweep) from settings.py (the run/asha/overfit sections), grid.py (the
points), space.py (a searched sweep's axes), validate.py (every field checked, the file and field
named), profiles.py and budget.py (a trial's estimated GPU-hours); data_check.py (the data fits every
point) and identity.py (the sweep id: spec, data and the code a trial imports).

May import: vpn/ and pipeline's top-level modules. Nothing of Ray or MLflow, and no other wing.
"""
