"""The sweep machinery. `python -m pipeline.sweep SPEC [--profile P]` runs one sweep (driver.py).

Four wings, each importing only the ones before it (tests/test_layout.py checks the direction):

- spec/     what a sweep is: the YAML read into typed values, its grid or space, its data and its id;
- record/   what MLflow keeps: runs, curves, pictures, results tables, registered models;
- trials/   how Ray Tune runs a trial: TrialConfig, the trainable, data-parallel workers, the searcher;
- cluster/  where trials can run: resources, placement, the GPU memory plan, storage that persists.

driver.py, above them all, runs one sweep from end to end (spec -> cluster -> trials -> record); it
is also the script that `ray submit CLUSTER.yaml pipeline/sweep/driver.py -- SPEC` runs. The map:
docs/architecture.md.
"""
