"""What every figure of a record is, in words: the record carries these texts (`definitions`), and the collector's
report reads the ones it shares (the phases, the fabric) from here, so each is written once. Pure data: imported
by the job (which writes the record) and by the collector (on login nodes, without torch).
"""

COMM_MEASUREMENT = (
    "comm = time from the last parameter gradient being accumulated (which completes DDP's last bucket and "
    "launches its all-reduce; counted by post-accumulate-grad hooks) to backward() returning, which waits for "
    "every bucket: the all-reduce time not overlapped with backward compute"
)
FSDP_COMM_MEASUREMENT = (
    "parallel=fsdp|hsdp: comm = the time the step waits on FSDP's collectives (the exposed communication): the "
    "all-gathers of each group's parameters (forward, and backward where resharded), the reduce-scatters of its "
    "gradients and HSDP's all-reduce across replicas, timed around each call (FSDP's set_custom_all_gather / "
    "set_custom_reduce_scatter, and its view of torch.distributed.all_reduce). On a CPU FSDP2 issues every "
    "collective synchronously (gloo, no communication streams), so the time inside them is the time the step waits "
    "for them; forward and backward compute are the rest of their interval"
)
FSDP_COMM_UNMEASURED = (
    "parallel=fsdp|hsdp on CUDA: not measured. FSDP's collectives run on their own streams and their calls return "
    "at once, so their exposed part is not the time inside them; comm is 0 and its waits count as compute (a "
    "profiler trace shows them: profiler.enabled=true)"
)
FABRIC = ("multi-rank jobs only, measured before training on the job's own allocation and backend: all-reduce time "
          "over message sizes from 8 bytes up to at least the gradient (the slowest rank's median of 5 timed "
          "iterations), algbw = bytes / time, busbw = algbw x 2(n-1)/n (nccl-tests' definitions), latency and "
          "bandwidth fitted to time = 2(n-1) latency + 2(n-1)/n bytes / bandwidth (pipeline.allreduce); transport: "
          "NCCL's choice read from its INFO log, tcp for gloo")

RECORD = {
    "timed steps": "all steps but the first `warmup_steps`, which include allocation, bucket rebuilding and caches",
    "timed_wall_s": "the largest over ranks of the summed durations of its timed steps",
    "throughput_samples_per_s": "global_batch x timed_steps / timed_wall_s",
    "throughput_per_rank_samples_per_s": "throughput_samples_per_s / world_size",
    "step_time_s": "per timed step, the slowest rank's duration (a DDP step ends with its slowest rank); "
                   "mean, median and 95th percentile over steps",
    "breakdown_s": "mean seconds per timed step in each phase, averaged over ranks; data + compute + comm = step",
    "data": "from the end of the previous step to the batch being on the device (indexing, copy, logging)",
    "compute": "forward and backward compute up to the last parameter gradient's accumulation (when DDP's last "
               "bucket's all-reduce is launched), plus the optimizer step",
    "comm": COMM_MEASUREMENT + "; 0 in a run of one rank, which communicates with nobody (that interval is counted "
            "as compute there). " + FSDP_COMM_MEASUREMENT,
    "micro_batch": "samples per rank in one forward and backward; grad_accum_steps micro-batches make a step, the "
                   "gradients of all but the last kept local (DDP's no_sync, FSDP's gradient-sync switch); "
                   "per_rank_batch = micro_batch x grad_accum_steps, global_batch = per_rank_batch x world_size",
    "parallel": "how the model was spread over the ranks: ddp (whole on every rank), fsdp (FSDP2's fully_shard on "
                "every repeated block, then the root: parameters, gradients and optimizer state split over "
                "shard_ranks ranks) or hsdp (split within a replica group, copied across replicas); collectives: "
                "per optimizer step, planned from the FSDP groups' sizes (nccl-tests' sizes: an all-gather's "
                "output, a reduce-scatter's input, an all-reduce's buffer); measured: rank 0's as FSDP issued "
                "them, per timed step (CPU)",
    "memory": "per rank: parameter, gradient and optimizer-state bytes counted from the tensors' local shards, "
              "each tensor once (exact; the gradients are the last step's, as the optimizer stepped on them); "
              "sharded_bytes: the part that is split over the shard group; peak: CUDA's peak allocated (and "
              "reserved) bytes, or on a CPU the process's peak resident set (getrusage ru_maxrss; glibc's malloc "
              "keeps freed memory, so it is an upper bound that depends on the allocator), baseline_bytes its "
              "resident set before the model was built; device_bytes: the GPU's memory, or on a CPU the host's "
              "memory over the ranks on the host",
    "fabric": FABRIC,
    "restarts": "after a restart (preemption or time limit), the timing figures cover the last uninterrupted "
                "stretch after its own warm-up; earlier_segments gives rank 0's throughput in the stretches before; "
                "resumed_from_step is the checkpoint's step, restart_count Slurm's SLURM_RESTART_COUNT",
    "flops_per_sample": "forward + backward FLOPs of one sample, counted by torch.utils.flop_counter."
                        "FlopCounterMode (matmuls, convolutions and, on CUDA, scaled_dot_product_attention); it "
                        "counts causal attention in full, the masked half included (the usual convention), and has "
                        "no formula for the CPU attention kernel, so on a CPU attention is not counted",
    "achieved_tflops_per_device": "flops_per_sample x throughput_samples_per_s / world_size / 1e12",
    "mfu": "achieved_tflops_per_device / the device's dense datasheet peak for the run's precision (GPUs only; "
           "a causal language model's masked attention half is in the FLOPs, see flops_per_sample); "
           "fp32 runs are compared with the plain-FP32 peak, though convolutions run as TF32 where device.tf32.cudnn "
           "is true (torch's default), so a convolutional fp32 run's MFU reads high",
    "final_train_loss": "the loss of the last training step on the global batch (mean over ranks)",
    "test_accuracy": "a classifier's share of the test split classified correctly after training (the split "
                     "sharded over ranks); null for other tasks",
    "evaluation": "the trained model on the held-out split (its first trainer.eval_samples samples, if set): loss = "
                  "the configured loss (or the model's own) averaged over target elements, targets of -100 skipped; "
                  "metric = accuracy where the logits score classes per sample or per position against integer "
                  "labels, perplexity = exp(loss) where they score the dataset's whole vocabulary at every position "
                  "(a language model; loss in nats per token), else the loss",
    "tokens_per_sample": "a token model's input length (integer token ids); tokens/s = tokens_per_sample x "
                         "throughput_samples_per_s",
    "status": "completed, or diverged: a loss was not finite (NaN, infinite) at diverged_at_step; the ranks agree "
              "on it every trainer.finite_check_every steps and stop together, and no figure of the record is then "
              "NaN (null, with the reason in missing); or pruned: a search's pruner (search.pruner) stopped the trial "
              "after its evaluation at pruned_at_step, which is then the record's evaluation",
    "evaluations": "the evaluations during training, every trainer.eval_every steps, as evaluation defines it, each "
                   "after `step` steps, across restarts; the step timer is stopped while they run, so no timing "
                   "figure includes them (wall_time_s does)",
    "missing": "a figure or file the run did not produce after training (the evaluation, flops_per_sample, the "
               "weights, TensorBoard), and why: the record is written regardless",
    "io": "how batches met the model: the items (pairs, or mappings and their keys), where the logits were read "
          "from the model's output, and which loss was back-propagated",
    "model_label": "the innermost torch.nn.Module class among the model config's _target_s, and its layers x width "
                   "(from its config) or its parameter count",
    "loader": "where batches came from: memory (the split held in memory, indexed) or dataloader (torch's "
              "DataLoader, with these settings); a data-bound run shows as a large data phase",
}
