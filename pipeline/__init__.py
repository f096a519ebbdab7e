"""pipeline: train PyTorch models with DDP on Slurm (or simulated nodes on one machine) and measure how they scale.

Three programs talk through the files of a run folder (`pipeline.rundir`); the code is organised by which of them
runs it:

    pipeline/launch.py, status.py   login node      launch a sweep, follow it      -> pipeline/launcher/ (no torch)
    pipeline/worker.py              every rank      train, time, write the record  -> pipeline/job/
    pipeline/collect.py             anywhere        tables, plots, report          -> pipeline/collector/ (no torch)

`pipeline/config.py` (the typed config), `pipeline/rundir.py` (the run folder's files) and `pipeline/result.py` (the
record's types) are shared and import no torch;
`pipeline/workloads/` holds the models and datasets that configs name by `_target_`.
"""
