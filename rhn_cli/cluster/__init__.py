"""Runs and sweeps on a Slurm cluster: submission through submitit, the job that trains
on the compute nodes (continuing its run across pre-emptions and time limits), and the
state of a sweep's jobs.

Above :mod:`rhn_cli.experiment` (it starts runs as ``rhn train`` does) and below the
CLI. Importing it imports neither torch nor submitit.
"""
