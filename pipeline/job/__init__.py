"""The job side: what every rank runs inside a job (local debug mode, submitit, srun, torchrun).

The rank's entry (`run`), its place in the job (`env`, `placement`), preemption, the DDP loop (`trainer`), its
timing, checkpoints, instrumentation (`observe`), FLOPs, and the record rank 0 writes (`record`).
"""
