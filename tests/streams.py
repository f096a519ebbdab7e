"""Streams as users write them (torch IterableDatasets), and a model that notes which samples it trained on, for the
stream tests (tests/test_streams.py). Every item is a mapping: `x` the input, `label` the target, `id` the sample's
number, which the pipeline passes to the model as a keyword."""

import glob
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

REPO = Path(__file__).resolve().parents[1]


class Numbered(IterableDataset):
    """`n` samples in order, read whole by whoever iterates it: it does not share itself out (the pipeline's
    Strided gives each rank and worker its share) and has no state of its own (a resume skips what was read)."""

    def __init__(self, n: int, features: int = 8):
        self.n, self.features = n, features

    def __iter__(self):
        for i in range(self.n):
            x = torch.sin(torch.arange(self.features, dtype=torch.float32) * (i + 1))
            yield {"x": x, "label": i % 3, "id": i}


class ShardFiles(IterableDataset):
    """Raw float32 shards of rows (id, label, `features` numbers) matched by `pattern`, read in order a block of rows
    at a time: it shares itself out (whole shards to each rank, and each worker a share of its rank's) and keeps
    its position (the shard and the row in it), so a resume reads nothing twice. What a user with data larger than
    memory writes: nothing is held but the block being read."""

    BLOCK = 256  # rows read at once

    def __init__(self, pattern: str, features: int, rank: int = 0, world_size: int = 1):
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise FileNotFoundError(f"no shard matches {pattern}")
        self.width, self.rank, self.world_size = features + 2, rank, world_size
        self.position, self.resume = (0, 0), None  # (the shard among this worker's, the row in it)

    def _mine(self) -> list[str]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.files[self.rank::self.world_size][worker::workers]

    def __iter__(self):
        (first, skip), self.resume = self.resume or (0, 0), None
        for index, path in enumerate(self._mine()[first:], start=first):
            row = skip if index == first else 0
            with open(path, "rb") as f:
                f.seek(row * self.width * 4)
                while block := f.read(self.BLOCK * self.width * 4):
                    for values in np.frombuffer(block, dtype=np.float32).reshape(-1, self.width):
                        row += 1
                        self.position = (index, row)
                        yield {"x": torch.tensor(values[2:]), "label": int(values[1]), "id": int(values[0])}

    def state_dict(self) -> dict:
        return {"shard": self.position[0], "row": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.resume = (state["shard"], state["row"])


def write_shards(folder: Path, shards: int, rows: int, features: int) -> None:
    """`shards` files of `rows` rows each: (id, label, features), ids counting across the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(folder / f"shard-{s:03d}.f32", "wb") as f:
            for start in range(s * rows, (s + 1) * rows, 4096):
                ids = np.arange(start, min(start + 4096, (s + 1) * rows), dtype=np.float32)
                block = np.empty((len(ids), features + 2), dtype=np.float32)
                block[:, 0], block[:, 1] = ids, ids % 3
                block[:, 2:] = np.sin(ids[:, None] * 0.001 + np.arange(features, dtype=np.float32))
                f.write(block.tobytes())


class NotingModel(torch.nn.Module):
    """A linear classifier that notes, in NOTES_DIR/rank-<rank>.txt, the ids of the samples each training step
    takes (one line a batch); the pipeline's two-sample checks and FLOP count are not noted. `delay_s`: a pause in
    each training forward, so that a signal can land mid-run."""

    def __init__(self, features: int = 8, classes: int = 3, delay_s: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)
        self.delay_s = delay_s
        self.notes = Path(os.environ["NOTES_DIR"]) if "NOTES_DIR" in os.environ else None

    def forward(self, x, id=None):
        if self.notes is not None and self.training and id is not None and len(id) != 2:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(self.notes / f"rank-{rank}.txt", "a") as f:
                f.write(" ".join(str(int(i)) for i in id) + "\n")
        if self.training and self.delay_s:
            time.sleep(self.delay_s)
        return self.linear(x)


CONFIGS = {
    "model/noting.yaml": "_target_: tests.streams.NotingModel\nfeatures: 8\ndelay_s: 0.0\n",
    "dataset/numbered.yaml": "_target_: tests.streams.Numbered\nn: 200\n",
    # Hugging Face's streaming json reader, 4 shards: whole shards to each rank, shards split among its workers
    "dataset/hf_stream.yaml": "_target_: datasets.load_dataset\npath: json\nstreaming: true\ndata_files:\n"
                              "  train: {data}/shards/train-*.jsonl\n  test: {data}/shards/test.jsonl\n",
    "dataset/shards.yaml": "_target_: tests.streams.ShardFiles\npattern: {data}/f32/*.f32\nfeatures: 1024\n",
    # WebDataset's layout (a sample's files share a name: 000007.x.npy, 000007.label.cls), read by Hugging Face
    "dataset/tar_shards.yaml": "_target_: datasets.load_dataset\npath: webdataset\nstreaming: true\ndata_files:\n"
                               "  train: {data}/tar/train-*.tar\n",
}


def user_folder(root: Path) -> Path:
    """A user's folder: config files (conf/) for the streams and the model, json shards (data/shards: 400 rows in 4
    training shards, and a test file) and the same rows as WebDataset tar shards (data/tar)."""
    for path, text in CONFIGS.items():
        (root / "conf" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / path).write_text(text.replace("{data}", str(root / "data")))
    hf = root / "data" / "shards"  # as docs/your-model.md's stream recipe has them
    hf.mkdir(parents=True)
    for name, ids in [*((f"train-{s}", range(s * 100, (s + 1) * 100)) for s in range(4)), ("test", range(1000, 1060))]:
        with open(hf / f"{name}.jsonl", "w") as f:
            for i in ids:
                f.write(json.dumps({"id": i, "x": [math.sin(i * (k + 1)) for k in range(8)], "label": i % 3}) + "\n")
    (root / "data" / "tar").mkdir()
    for s in range(4):
        with tarfile.open(root / "data" / "tar" / f"train-{s}.tar", "w") as tar:
            for i in range(s * 100, (s + 1) * 100):
                x = io.BytesIO()
                np.save(x, np.sin(np.arange(1, 9, dtype=np.float32) * i))
                for name, data in (("x.npy", x.getvalue()), ("label.cls", str(i % 3).encode())):
                    member = tarfile.TarInfo(f"{i:06d}.{name}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return root


def stream_env(user: Path, notes: Path) -> dict:
    """A launch's environment: the tests' modules importable, the model's notes in `notes`, Hugging Face offline."""
    notes.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    return {**base, "PYTHONPATH": str(REPO), "NOTES_DIR": str(notes), "HF_DATASETS_CACHE": str(user / "hf-cache"),
            "HF_DATASETS_OFFLINE": "1"}
