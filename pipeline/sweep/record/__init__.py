"""The record wing: what MLflow keeps. Every write to and read from the tracking store starts here.

tracking.py (the store, the client), outage.py (a server that is away: calls that wait for it),
outbox.py (a trial's metrics, pictures and system metrics, held through an outage, never a step
twice), runs.py (a run per grid point), parent.py (the sweep's parent run), pictures.py and
forecasting.py (what a trial logs besides its curves), results.py (the tables read back, the one
ranking), registry.py, futures.py and pyfunc_model.py (the best trial as registered models;
pyfunc_model.py is their code, run when they load) and lineage.py (the code each sweep and run ran: a
sweep continued under new code).

May import: the spec wing, vpn/ and pipeline's top-level modules. Nothing of Ray.
"""
