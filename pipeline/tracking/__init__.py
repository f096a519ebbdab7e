"""Experiment trackers (tracking=[mlflow], [wandb]): a point's run in MLflow or Weights & Biases, the same run across
every restart, and what its run folder holds sent there afterwards (`pipeline.track sync`). Torch-free: the
launch checks it, rank 0 logs through it (pipeline.job.tracking), and the login node syncs through it.

    trackers.py  each tracker's client, behind one interface: open (create or continue), log, end, what it holds
    sync.py      a point's metrics.jsonl and record sent to its trackers, each step once
"""
