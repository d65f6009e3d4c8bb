"""The cluster wing: where a sweep's trials can run, checked before anything is created.

placement.py (the profile for the cluster, trial resources, a placement that can hold them, the GPUs
probed), plan.py (the memory plan: what one GPU must hold, and the settings that make it fit),
persist.py (results that outlive Ray's uploaded working directory), claim.py (the sweep a driver
drives, its Ray folder set aside on --start-over), lease.py (one driver per sweep: its lease, held
in the MLflow store that every driver of the sweep shares), tracking_server.py (the head's MLflow
server: PostgreSQL behind it, the admin's and the trials' logins; the configs' head runs it) and
slurm.py (a sweep inside a Slurm job: sweeps/slurm.sbatch's steps, and whether a lease's Slurm job
has ended).

May import: the spec, record and trials wings, vpn/ and pipeline's top-level modules.
"""
