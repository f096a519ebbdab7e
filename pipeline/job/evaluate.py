"""The trained model on the held-out split, on every rank at once: accuracy for a classifier, perplexity for a language
model, the mean loss for anything else, as the record's `evaluation` states it."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from pipeline.job.context import Job
from pipeline.job.data import Batches
from pipeline.job.model_io import ModelIO
from pipeline.job.parallel import Parallel
from pipeline.result import Evaluation

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # torch's cross_entropy and Hugging Face's losses skip targets of this value


class EvaluationFailed(Exception):
    pass


class Evaluator:
    """The held-out split (its first trainer.eval_samples samples, if set), every world_size-th sample on each rank
    (a stream's share of it), through the training's batching code; the sums are reduced over ranks. Accuracy
    when the logits score classes per sample (or per position) against integer labels, perplexity = exp(mean token
    loss) when they score a dataset's vocabulary at every position (a language model), else the loss alone.
    Targets of -100 are skipped, as torch's and Hugging Face's losses skip them. A failure on any rank is raised on
    every rank as EvaluationFailed (none waits for another in a collective)."""

    def __init__(self, job: Job, test_set: Any | None, source: str | None, batches: Batches, io: ModelIO, autocast):
        self.job, self.test_set, self.batches, self.io, self.autocast = job, test_set, batches, io, autocast
        self.source = source  # where the held-out samples come from, in words (the record's evaluation.split)

    @torch.no_grad()
    def evaluate(self, parallel: Parallel) -> Evaluation | None:
        """None when the dataset holds nothing out."""
        test, job = self.test_set, self.job
        if test is None:
            return None
        parallel.sync_buffers()
        parallel.wrapped.eval()
        # loss x targets, targets, correct, scored (classifier), scored (language model), failed, samples
        sums = torch.zeros(7, dtype=torch.float64, device=job.device)
        error = ""
        try:
            for batch in self.batches.held_out(test, job.run.trainer.eval_samples):
                with self.autocast:
                    loss, logits = self.io.loss_and_logits(parallel.raw, batch)
                score(sums, loss, logits, batch.targets, getattr(test, "vocab_size", None))
                sums[6] += len(batch.targets)
        except Exception as e:
            log.error("rank %d: evaluation failed: %s: %s", job.rank, type(e).__name__, e)
            error = f"evaluation failed on rank {job.rank}: {type(e).__name__}: {e}"[:500]
            sums.zero_()
            sums[5] = 1
        parallel.reshard()
        dist.all_reduce(sums)
        if sums[5] > 0:
            raise EvaluationFailed(error or f"evaluation failed on {int(sums[5])} other rank(s) (their logs say why)")
        mean_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else math.nan
        if sums[4] > 0 and sums[3] == 0:
            metric, value = "perplexity", math.exp(mean_loss) if mean_loss < 700 else math.inf
        elif sums[3] > 0 and sums[4] == 0:
            metric, value = "accuracy", (sums[2] / sums[3]).item()
        else:
            metric, value = "loss", mean_loss
        if not (math.isfinite(mean_loss) and math.isfinite(value)):
            raise EvaluationFailed(f"the evaluation's {metric} is not finite ({value})")
        return Evaluation(split=self.source or "test", samples=int(sums[6]), loss=mean_loss, metric=metric, value=value)


def score(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor,
          vocab: int | None) -> None:
    """Add one batch to the evaluation's sums (see Evaluator)."""
    valid = y != IGNORE_INDEX if not y.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
    count = valid.sum()
    sums[0] += loss.double() * count
    sums[1] += count
    if logits is None or y.is_floating_point() or logits.dim() != y.dim() + 1 or logits.shape[:-1] != y.shape:
        return
    if vocab is not None and y.dim() >= 2 and logits.shape[-1] >= vocab:
        sums[4] += count
    else:
        sums[2] += ((logits.argmax(dim=-1) == y) & valid).sum()
        sums[3] += count
