"""The launch side: turn sweep points into runs (simulated nodes here, or Slurm jobs), follow them, resubmit.

Runs on login nodes, so nothing in this package imports torch or `pipeline.job` (a test checks).
"""
