"""Models nobody here wrote, trained as their users write them: Hugging Face models built from their configs (no
download), a nanoGPT-style model that computes its own loss, a timm-style factory, a dataset of mappings. The
configs and commands are the worked examples of docs/your-model.md, read from that page, so it cannot drift from
what works. Then the paths that used to train to the end and lose the record, and every bad input named."""

import contextlib
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.result import Result
from tests.conftest import REPO

YOUR_MODEL = (REPO / "docs/your-model.md").read_text()
EXAMPLES = YOUR_MODEL[YOUR_MODEL.index("### Worked examples"):YOUR_MODEL.index("## What is checked, and when")]
LEARNED = math.exp(math.log(256) - 0.1)  # perplexity: 0.1 nats below an untrained model's ln(256) in 30 steps
FAST = ["trainer.max_steps=30", "trainer.log_every=1000", "trainer.warmup_steps=3", "trainer.eval_samples=256",
        "trainer.tensorboard=false"]

FIRST_MODEL = re.search(r"```python\n# ~/mycode/mypkg/models.py\n(.*?)```", YOUR_MODEL, re.S).group(1)
FIRST_COMMAND = re.search(r"^python -m pipeline.launch ('~model' .*?)   #", YOUR_MODEL, re.M).group(1)


@pytest.mark.e2e
def test_the_first_model_of_the_page_trains_as_its_command_says(tmp_path):
    """The page's first nn.Module, in a package of the user's on PYTHONPATH, trained by the page's command line."""
    (tmp_path / "mycode/mypkg").mkdir(parents=True)
    (tmp_path / "mycode/mypkg/__init__.py").write_text("")
    (tmp_path / "mycode/mypkg/models.py").write_text(FIRST_MODEL)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mycode")}
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", *shlex.split(FIRST_COMMAND), "trainer.max_steps=30",
                        "trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=512",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = Result.read(tmp_path / "run")
    assert record.model == "net" and record.model_label.startswith("Net ") and record.test_accuracy > 0.5


USER_CODE = {
    "data.py": '''
        import torch
        from torch.utils.data import Dataset


        class Reviews(Dataset):
            """Padded token sequences, labelled by whether token 1 occurs in them: a small text classification whose
            items are mappings, as Hugging Face's datasets give them."""

            vocab_size, num_classes, seq_len = 64, 2, 24

            def __init__(self, size, split="train"):
                g = torch.Generator().manual_seed(0 if split == "train" else 1)
                lengths = torch.randint(8, self.seq_len + 1, (size,), generator=g)
                self.mask = (torch.arange(self.seq_len) < lengths[:, None]).long()
                self.ids = torch.randint(2, self.vocab_size, (size, self.seq_len), generator=g) * self.mask
                self.labels = (torch.rand(size, generator=g) < 0.5).long()
                where = (torch.rand(size, generator=g) * lengths).long()
                self.ids[self.labels == 1, where[self.labels == 1]] = 1

            def __len__(self):
                return len(self.labels)

            def __getitem__(self, i):
                return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}
        ''',
    "nano.py": '''
        import torch
        import torch.nn.functional as F
        from torch import nn


        class GPT(nn.Module):
            """As nanoGPT's model.py: forward(idx, targets=None) -> (logits, loss), every position's logits only when
            given the targets (else the last position's), and configure_optimizers returning an AdamW."""

            def __init__(self, vocab_size, block_size, n_layer=2, n_embd=64, n_head=2):
                super().__init__()
                self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
                self.h = nn.ModuleList(nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0,
                                                                  batch_first=True, norm_first=True)
                                       for _ in range(n_layer))
                self.ln_f = nn.LayerNorm(n_embd)
                self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
                self.wte.weight = self.lm_head.weight

            def forward(self, idx, targets=None):
                t = idx.shape[1]
                x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
                mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
                for block in self.h:
                    x = block(x, src_mask=mask, is_causal=True)
                x = self.ln_f(x)
                if targets is None:
                    return self.lm_head(x[:, [-1], :]), None
                logits = self.lm_head(x)
                return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

            def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
                params = [p for p in self.parameters() if p.requires_grad]
                groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
                return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
        ''',
    "zoo.py": '''
        from torch import nn


        class TinyConvNet(nn.Module):
            def __init__(self, num_classes=1000, in_chans=3, width=16):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

            def forward(self, x):
                return self.body(x)


        def create_model(model_name, pretrained=False, **kwargs):
            """timm's entry point, in miniature: a registry of model classes, their arguments through **kwargs."""
            if pretrained:
                raise ValueError("nothing is downloaded here")
            return {"tiny_convnet": TinyConvNet}[model_name](**kwargs)
        ''',
    "odd.py": '''
        import torch
        from torch import nn


        class DictNet(nn.Module):
            """Returns a dict (logits and an auxiliary score); has a parameter no loss uses; and, with
            fail_in_eval, an evaluation that fails."""

            def __init__(self, input_shape, num_classes, fail_in_eval=False):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, num_classes))
                self.unused = nn.Linear(4, 4)
                self.fail_in_eval = fail_in_eval

            def forward(self, x):
                if self.fail_in_eval and not self.training:
                    raise RuntimeError("this model cannot be evaluated")
                logits = self.body(x)
                return {"logits": logits, "aux": logits.pow(2).mean()}


        def loss_with_aux(output, target):
            """A user's loss that reads the whole output, as written for Hugging Face outputs."""
            return torch.nn.functional.cross_entropy(output["logits"], target) + 1e-3 * output["aux"]


        class NoLogits(nn.Module):
            """Returns its logits under a name of its own, and no loss even when given the labels."""

            def __init__(self, input_shape, num_classes):
                super().__init__()
                self.layer = nn.Linear(28 * 28, num_classes)

            def forward(self, x, labels=None):
                return {"scores": self.layer(x.flatten(1))}
        ''',
    "broken.py": '''
        import a_module_that_does_not_exist  # noqa: F401
        ''',
}


def config_files() -> dict[str, str]:
    """The worked examples' YAML files (docs/your-model.md), by their path under myconf/."""
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", EXAMPLES, re.S):
        first, _, body = block.partition("\n")
        assert first.startswith("# myconf/"), first
        files[first[len("# myconf/"):]] = body
    return files


def commands(model: str) -> list[list[str]]:
    """The worked examples' launch commands for a model (docs/your-model.md), as argument lists."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", EXAMPLES, re.S) for line in block.splitlines()]
    return [line.split()[3:] for line in lines if line.startswith("python -m pipeline.launch") and
            f"model={model} " in line + " "]


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """The user's package (their model, their dataset) and config folder, outside the repository."""
    root = tmp_path_factory.mktemp("user")
    (root / "code/mypkg").mkdir(parents=True)
    (root / "code/mypkg/__init__.py").write_text("")
    for name, code in USER_CODE.items():
        (root / "code/mypkg" / name).write_text(textwrap.dedent(code).lstrip())
    for path, text in config_files().items():
        (root / "myconf" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "myconf" / path).write_text(text)
    write_rows(root / "data/rows")
    return root


def write_rows(folder, features: int = 16, classes: int = 4) -> None:
    """The worked example's JSON lines: 16 numbers around one of 4 class prototypes, and the class; the test file
    drawn apart from the train file."""
    import json
    import random

    folder.mkdir(parents=True, exist_ok=True)
    prototypes = [[random.Random(c).gauss(0, 3) for _ in range(features)] for c in range(classes)]
    for split, n, seed in (("train", 1024, 0), ("test", 256, 1)):
        rng = random.Random(seed)
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                label = rng.randrange(classes)
                f.write(json.dumps({"features": [x + rng.gauss(0, 1) for x in prototypes[label]], "label": label})
                        + "\n")


def run(user_folder, name: str, args: list[str], timeout: float = 400) -> tuple[subprocess.CompletedProcess, str]:
    out = user_folder / "runs" / name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    env["PYTHONPATH"] = str(user_folder / "code")
    env.update(HF_DATASETS_CACHE=str(user_folder / "hf-cache"), HF_DATASETS_OFFLINE="1")  # nothing downloaded
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", *args, *FAST,
                        f"hydra.searchpath=[file://{user_folder / 'myconf'}]", f"hydra.run.dir={out}"],
                       cwd=user_folder, env=env, text=True, capture_output=True, timeout=timeout)
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("node*-rank*.log"))) if out.exists() else ""
    return r, logs


def record(user_folder, name: str) -> Result:
    return Result.read(user_folder / "runs" / name)


def test_the_docs_have_the_worked_examples():
    assert set(config_files()) == {"model/hf_gpt2.yaml", "model/hf_bert.yaml", "dataset/reviews.yaml",
                                   "model/nanogpt.yaml", "model/timmish.yaml", "dataset/hf_rows.yaml",
                                   "dataset/hf_one_file.yaml"}
    assert [len(commands(m)) for m in ("hf_gpt2", "hf_bert", "nanogpt", "timmish", "mlp")] == [2, 2, 1, 1, 2]


# ------------------------------------------------------------------------------ data nobody here wrote
@pytest.mark.e2e
def test_hugging_face_datasets_from_local_files_with_their_own_or_a_held_out_evaluation(user_folder):
    """load_dataset("json") from YAML alone, rows of a list and a label collated with no collate_fn: with a test
    file, and with one file and a tenth of it held out; the record says where its evaluation came from."""
    pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
    two, one = commands("mlp")
    for name, args, source in (("hf-two", two, "the dataset built with split='test'"),
                               ("hf-one", one, "holdout: 103 of the 1024 training rows (0.1), never trained on")):
        r, logs = run(user_folder, name, [*args, "trainer.epochs=20", "trainer.eval_samples=0"])
        assert r.returncode == 0, r.stderr + logs
        rec = record(user_folder, name)
        assert rec.status == "completed" and rec.world_size == 2 and rec.evaluation.split == source
        assert rec.evaluation.metric == "accuracy" and rec.evaluation.value > 0.5  # chance: 0.25
        assert rec.evaluation.samples == (256 if name == "hf-two" else 103)
        assert rec.io.batch == "mappings: features the input, label the targets"


@pytest.mark.e2e
def test_a_held_out_set_that_is_the_training_data_or_missing_is_refused_at_launch(user_folder):
    pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
    _, one = commands("mlp")
    without_holdout = [a for a in one if not a.startswith("evaluate.")]
    r, _ = run(user_folder, "hf-no-test", without_holdout, timeout=120)
    assert r.returncode == 2 and "evaluate.split='test': dataset._target_=datasets.load_dataset has no such " \
        "split" in r.stderr and "evaluate.holdout=0.1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    two, _ = commands("mlp")
    r, _ = run(user_folder, "hf-no-file", [*two, "dataset.data_files.train=data/rows/nowhere.jsonl"], timeout=120)
    assert r.returncode == 2 and "dataset.data_files.train='data/rows/nowhere.jsonl' matches no file" in r.stderr, \
        r.stderr
    # rows whose field changes type (a list, then a string): Hugging Face types it Json, which nothing collates
    (user_folder / "data/rows/mixed.jsonl").write_text('{"features": [1.0, 2.0], "label": 0}\n'
                                                       '{"features": "x", "label": 1}\n')
    r, _ = run(user_folder, "hf-mixed", [*two, "dataset.data_files.train=data/rows/mixed.jsonl"], timeout=120)
    assert r.returncode == 2 and "the rows' field 'features' differs in type from row to row" in r.stderr and \
        "Traceback" not in r.stderr, r.stderr
    # Dataset.from_dict takes `split` as a mere label: its "test" set would be the training rows
    same = ["model=mlp", "dataset=hf_rows", "dataset._target_=datasets.Dataset.from_dict", "~dataset.path",
            "~dataset.data_files", "+dataset.mapping={features:[[1.0,2.0],[3.0,4.0]],label:[0,1]}",
            "io.input_key=features", "io.target_key=label", "model.input_shape=[1,1,2]", "model.num_classes=2"]
    r, _ = run(user_folder, "hf-same", same, timeout=120)
    assert r.returncode == 2 and "are the training data (the same 2 rows" in r.stderr, r.stderr
    r, _ = run(user_folder, "hf-same-off", [*same, "evaluate.enabled=false", "trainer.epochs=10",
                                           "trainer.batch_size=1"], timeout=120)
    assert r.returncode == 0, r.stderr
    off = record(user_folder, "hf-same-off")
    assert off.evaluation is None and off.missing["evaluation"] == "not evaluated: evaluate.enabled=false"


class SplitRecorder:
    """A dataset whose rows are the split it was built with."""

    def __init__(self, split: str = "train", size: int = 8):
        self.split, self.size = split, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"input_ids": [i, i], "labels": f"{self.split}"}


def test_an_explicit_split_is_passed_as_given_and_held_out_rows_are_fixed(compose_cfg):
    from pipeline.config import parse_run_config, to_plain
    from pipeline.targets import build_datasets, held_out

    base = to_plain(parse_run_config(compose_cfg()))

    def splits(dataset: dict, **evaluate):
        config = {**base, "dataset": dataset, "evaluate": {**base["evaluate"], **evaluate}}
        return build_datasets(parse_run_config(config), rank=0)

    plain = splits({"_target_": "tests.test_ecosystem.SplitRecorder"})
    assert (plain.train.split, plain.test.split) == ("train", "test")
    given = splits({"_target_": "tests.test_ecosystem.SplitRecorder", "split": "train[:50%]"}, split="validation")
    assert (given.train.split, given.test.split) == ("train[:50%]", "validation")
    assert given.source == "the dataset built with split='validation'"
    a, b = held_out(list(range(100)), 0.1), held_out(list(range(100)), 0.1)
    rows = [[x[i] for i in range(len(x))] for x in (a.train, a.test)]
    assert len(rows[1]) == 10 and sorted(rows[0] + rows[1]) == list(range(100))
    assert rows == [[x[i] for i in range(len(x))] for x in (b.train, b.test)]  # the same rows every time


def test_rows_of_lists_collate_to_tensors_and_uneven_ones_are_named():
    from pipeline.job.data import collate_rows

    batch = collate_rows([{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4, 5, 6], "labels": 1}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]] and batch["labels"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"the rows' 'input_ids' differ in shape within a batch \(\(2,\) to \(3,\)\)"):
        collate_rows([{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4, 5], "labels": 1}])


def pad_to(items, length, value):
    """A collate function with arguments of its own, for loader.collate_fn."""
    import torch

    return {"input_ids": torch.tensor([list(i["input_ids"]) + [value] * (length - len(i["input_ids"]))
                                       for i in items]), "labels": torch.tensor([i["labels"] for i in items])}


def test_a_collate_function_is_taken_as_a_partial(compose_cfg):
    from pipeline.config import parse_run_config
    from pipeline.job.build import build_collate

    run = parse_run_config(compose_cfg("loader.collate_fn={_target_:tests.test_ecosystem.pad_to,length:4,value:9}"))
    batch = build_collate(run, rank=0)([{"input_ids": [1], "labels": 0}, {"input_ids": [2, 3], "labels": 1}])
    assert batch["input_ids"].tolist() == [[1, 9, 9, 9], [2, 3, 9, 9]]


# ----------------------------------------------------------------------------- models nobody here wrote
@pytest.mark.e2e
@pytest.mark.parametrize("own_loss", [False, True], ids=["default-loss", "model-loss"])
def test_hugging_face_causal_lm(user_folder, own_loss):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    name = f"gpt2-{own_loss}"
    r, logs = run(user_folder, name, commands("hf_gpt2")[own_loss])
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, name)
    assert rec.status == "completed" and rec.world_size == 2 and len({x.parameters_sha256 for x in rec.ranks}) == 1
    assert rec.model_label == "GPT2LMHeadModel 2x64" and rec.tokens_per_sample == 64
    assert rec.io.logits == "attribute logits" and rec.utilisation.flops_per_sample > 0 and rec.missing == {}
    # learned something of the bigram language: an untrained model's perplexity is the vocabulary's, 256
    assert rec.evaluation.metric == "perplexity" and rec.evaluation.value < LEARNED and rec.test_accuracy is None
    if not own_loss:
        assert rec.io.loss.startswith("loss._target_ on the logits")
        return
    assert "the model's own (attribute loss), given the inputs as the keyword labels" == rec.io.loss
    # param_groups.no_decay: biases, LayerNorm weights and the (tied) embeddings without weight decay
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=256))
    exempt = sum(p.numel() for p in model.parameters() if p.dim() < 2) + model.transformer.wpe.weight.numel() + \
        model.transformer.wte.weight.numel()
    decay, no_decay = rec.optimizer.groups
    assert rec.optimizer.name == "AdamW" and (decay.weight_decay, no_decay.weight_decay) == (0.01, 0.0)
    assert no_decay.parameters == exempt and decay.parameters + no_decay.parameters == rec.model_parameters


@pytest.mark.e2e
@pytest.mark.parametrize("own_loss", [False, True], ids=["default-loss", "model-loss"])
def test_hugging_face_sequence_classifier_on_mapping_items(user_folder, own_loss):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    name = f"bert-{own_loss}"
    r, logs = run(user_folder, name, commands("hf_bert")[own_loss])
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, name)
    assert rec.model_label == "BertForSequenceClassification 2x64" and rec.loader.kind == "dataloader"
    assert rec.io.batch == ("mappings: input_ids the input, labels the targets, attention_mask passed to the model "
                            "as keywords")
    assert rec.io.loss.startswith("the model's own (attribute loss)" if own_loss else "loss._target_ on the logits")
    # a text classifier (its dataset has a vocabulary) is scored by accuracy, not perplexity
    assert rec.evaluation.metric == "accuracy" and rec.test_accuracy == rec.evaluation.value
    assert rec.evaluation.samples == 256 and rec.tokens_per_sample == 24


@pytest.mark.e2e
def test_nanogpt_style_model_with_its_own_loss_and_optimizer(user_folder):
    r, logs = run(user_folder, "nano", commands("nanogpt")[0])
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, "nano")
    assert rec.io.loss == "the model's own (element 1), given the targets as the keyword targets"
    assert rec.io.logits == "element 0" and rec.evaluation.metric == "perplexity"
    assert rec.evaluation.value < LEARNED and rec.model_label.startswith("GPT ")
    # configure_optimizers made the optimizer, from the optimizer config's values
    assert rec.optimizer.name == "AdamW" and [g.weight_decay for g in rec.optimizer.groups] == [0.01, 0.0]
    assert {g.lr for g in rec.optimizer.groups} == {1e-3}


@pytest.mark.e2e
def test_timm_style_factory_gets_the_class_count_only_when_asked(user_folder):
    r, logs = run(user_folder, "timm", commands("timmish")[0])
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, "timm")
    assert rec.model_label.startswith("TinyConvNet") and rec.evaluation.metric == "accuracy"
    # 16 x 3 x 3 x 3 + 16 conv, 16 x 10 + 10 head: the dataset's 10 classes
    assert rec.model_parameters == 16 * 27 + 16 + 16 * 10 + 10
    # without it, a **kwargs factory gets nothing unasked: its own 1000-class head, and the log says so
    r, logs = run(user_folder, "timm-unasked", [*commands("timmish")[0], "~model.num_classes", "nodes=1"])
    assert r.returncode == 0, r.stderr + logs
    assert "takes **kwargs, so it was not given the dataset's num_classes=10" in logs
    assert "not given: input_shape, num_classes" in logs
    assert record(user_folder, "timm-unasked").model_parameters == 16 * 27 + 16 + 16 * 1000 + 1000


@pytest.mark.e2e
@pytest.mark.parametrize("model, block", [("hf_gpt2", "GPT2Block"), ("nanogpt", "TransformerEncoderLayer")])
def test_models_nobody_here_wrote_shard_per_block_under_fsdp(user_folder, model, block):
    """The worked examples' Hugging Face GPT-2 (its _no_split_modules names its blocks) and nanoGPT-style model
    (repeated torch TransformerEncoderLayers, found), sharded per block with activation checkpointing."""
    if model == "hf_gpt2":
        pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    name = f"fsdp-{model}"
    r, logs = run(user_folder, name, [*commands(model)[0], "parallel=fsdp", "trainer.activation_checkpointing=true"])
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, name)
    assert (rec.parallel.kind, rec.parallel.blocks, rec.parallel.block_classes) == ("fsdp", 2, [block])
    assert rec.status == "completed" and rec.missing == {} and rec.evaluation.value < LEARNED
    # all of the state sharded but AdamW's step counts: one float32 per parameter tensor, on every rank
    held = rec.ranks[0].memory
    assert held.state_bytes - held.sharded_bytes == 4 * sum(g.tensors for g in rec.optimizer.groups)


# ------------------------------------------------------------------ paths that trained and lost the record
@pytest.mark.e2e
def test_a_loss_of_the_whole_output_and_an_unused_parameter_under_static_graph(user_folder):
    """A user loss reading the output dict (io.loss_on=output), a parameter nothing uses, DDP's static graph: it
    trains, evaluates from the dict's logits, and counts FLOPs over the parameters that have gradients."""
    args = ["~model", "+model._target_=mypkg.odd.DictNet", "~loss", "+loss._target_=mypkg.odd.loss_with_aux",
            "+loss._partial_=true", "io.loss_on=output", "ddp.static_graph=true", "nodes=2",
            "dataset.train_size=1024", "dataset.test_size=256"]
    r, logs = run(user_folder, "dict-static", args)
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, "dict-static")
    assert rec.io.logits == "key logits" and rec.io.loss == "loss._target_ on the whole output and the targets"
    assert rec.evaluation.metric == "accuracy" and rec.utilisation.flops_per_sample > 0 and rec.missing == {}
    # the same model under find_unused_parameters, which DDP's own error message asks for
    r, logs = run(user_folder, "dict-unused", [*args[:-4], "ddp.find_unused_parameters=true", "nodes=2",
                                               "dataset.train_size=1024", "dataset.test_size=256"])
    assert r.returncode == 0, r.stderr + logs
    assert record(user_folder, "dict-unused").config["ddp"]["find_unused_parameters"] is True


@pytest.mark.e2e
def test_an_evaluation_that_fails_leaves_a_record_that_says_why(user_folder):
    args = ["~model", "+model._target_=mypkg.odd.DictNet", "+model.fail_in_eval=true", "nodes=2",
            "ddp.find_unused_parameters=true", "dataset.train_size=1024", "dataset.test_size=256"]
    r, logs = run(user_folder, "eval-fails", args)
    assert r.returncode == 0, r.stderr + logs
    rec = record(user_folder, "eval-fails")
    assert rec.evaluation is None and rec.test_accuracy is None and rec.status == "completed"
    assert "this model cannot be evaluated" in rec.missing["evaluation"]
    assert rec.timing.throughput_samples_per_s > 0 and rec.weights == "model.pt"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.e2e
@pytest.mark.parametrize("args, expected", [
    (["~model", "+model._target_=mypkg.broken.Net"],
     "model._target_=mypkg.broken.Net: its module mypkg.broken ("),
    (["~model", "+model._target_=mypkg.odd.NoLogits"],
     "the model returned a dict with keys ['scores'], with no logits in it"),
    (["~model", "+model._target_=mypkg.odd.NoLogits", "loss=model"],
     "loss=model: the model returned a dict with keys ['scores'], with no loss in it"),
    (["~model", "+model._target_=mypkg.zoo.create_model", "+model.model_name=tiny_convnet", "+model.in_chans=1",
      "+model.num_classes=${from_dataset:vocab_size}"],
     "model.num_classes=${from_dataset:vocab_size}: the train dataset has no vocab_size (it has: input_shape, "
     "num_classes); set model.num_classes to a value"),
    (["~model", "+model._target_=mypkg.odd.DictNet", "loss=model"],
     "DictNet.forward() got an unexpected keyword argument 'labels' (loss=model passes the targets as the keyword "
     "loss.targets_as=labels: set it to the name the model's forward takes, or null to pass them positionally)"),
    (["param_groups.method=configure_optimizers"],
     "param_groups.method=configure_optimizers: the model (MLP) has no such method (rank 0)"),
    (["+model.num_classes=5"], "model.num_classes=5 is smaller than the dataset's num_classes=10"),
], ids=["import-error", "no-logits", "no-loss", "dataset-lacks-it", "targets-keyword", "no-method", "too-few"])
def test_bad_input_in_the_job_names_the_key(user_folder, args, expected):
    name = f"bad-{abs(hash(tuple(args)))}"
    r, logs = run(user_folder, name, [*args, "trainer.max_steps=2"], timeout=120)
    assert r.returncode != 0 and expected in r.stderr + logs, r.stderr + logs


def test_bad_input_at_launch_names_the_key(tmp_path):
    from tests.conftest import launch

    for args, expected in ((["+model.x=${from_dataset:classes}"], "NAME='classes' is not allowed; choose one of: "
                                                                  "input_shape, num_classes, vocab_size, seq_len"),
                           (["param_groups.no_decay=true", "param_groups.method=configure_optimizers"],
                            "param_groups.no_decay and param_groups.method are both set"),
                           (["loss=model", "loss.targets_from=labels"],
                            "loss.targets_from='labels' is not allowed; choose one of: targets, inputs"),
                           (["io.loss_on=everything"], "io.loss_on='everything' is not allowed"),
                           (["io.input_key=x", "io.target_key=x"], "io.input_key and io.target_key are both 'x'"),
                           (["loader.collate_fn={_target_:nowhere_to_be_found.collate}"],
                            "loader.collate_fn._target_=nowhere_to_be_found.collate: no module of it")):
        r = launch(*args, "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert r.returncode == 2 and expected in r.stderr, (args, r.stderr)


# ------------------------------------------------------------------------------------- the pieces, in process
def test_outputs_are_read_as_the_ecosystem_returns_them():
    from pipeline.config import IOConfig
    from pipeline.job.data import Batch
    from pipeline.job.model_io import ModelIO
    from pipeline.workloads.losses import CrossEntropy, ModelLoss

    logits, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    batch = Batch(torch.zeros(3, 2), y, {})

    class ModelOutput(dict):  # as Hugging Face's: a mapping whose keys are also attributes
        __getattr__ = dict.__getitem__

    cases = [(logits, "the output itself (a tensor)"), (ModelOutput(logits=logits, loss=None), "attribute logits"),
             ({"logits": logits}, "key logits"), ((logits, torch.tensor(1.0)), "element 0"), ([logits], "element 0")]
    for out, how in cases:
        io = ModelIO(IOConfig(), CrossEntropy(), "pairs")
        loss, got = io.loss_and_logits(lambda x, out=out: out, batch)
        assert got is logits and io.info().logits == how and loss.item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits, y).item())
    io = ModelIO(IOConfig(output="1"), CrossEntropy(), "pairs")
    assert io.loss_and_logits(lambda x: (None, logits), batch)[1] is logits
    io = ModelIO(IOConfig(output="scores"), CrossEntropy(), "pairs")
    assert io.loss_and_logits(lambda x: {"scores": logits}, batch)[1] is logits
    # the model's own loss: an attribute, a key, a tuple's 0-dim tensor; it gets the targets by keyword
    seen = {}

    def nano(x, targets=None):
        seen["targets"] = targets
        return logits, torch.tensor(2.5)

    io = ModelIO(IOConfig(), ModelLoss(targets_as="targets"), "pairs")
    loss, got = io.loss_and_logits(nano, batch)
    assert loss.item() == 2.5 and got is logits and seen["targets"] is y
    positional = ModelIO(IOConfig(), ModelLoss(targets_as=None), "pairs")
    assert positional.loss_and_logits(lambda x, t: ModelOutput(loss=torch.tensor(1.5), logits=None), batch)[0] == 1.5


def test_scheduler_gets_the_run_length_by_its_own_name(compose_cfg):
    from pipeline.config import parse_run_config
    from pipeline.job.build import build_scheduler

    def lrs(*overrides, steps=20):
        run = parse_run_config(compose_cfg(*overrides))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = build_scheduler(run, opt, steps, rank=0)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return out

    # warm-up then cosine: linear from 1e-3 to 1 over 5 steps, then cosine over the other 15
    got = lrs("scheduler=warmup_cosine", "scheduler.warmup_steps=5")
    assert got[:6] == pytest.approx([1e-3 + (1 - 1e-3) * i / 5 for i in range(6)])
    assert got[5:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 15)) for i in range(15)])
    # torch's LinearLR and PolynomialLR take it as total_iters
    got = lrs("+scheduler._target_=torch.optim.lr_scheduler.PolynomialLR", "+scheduler._partial_=true")
    assert got[0] == 1.0 and got[10] == pytest.approx(0.5) and got[-1] == pytest.approx(0.05)
    # Hugging Face's schedules as num_training_steps
    pytest.importorskip("transformers", reason="transformers is not installed")
    got = lrs("+scheduler._target_=transformers.get_linear_schedule_with_warmup", "+scheduler._partial_=true",
              "+scheduler.num_warmup_steps=4")
    assert got[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]) and got[-1] == pytest.approx(1 / 16)


class LightningStyle(torch.nn.Module):
    """Lightning's hooks on a plain module (lightning itself is not installed here): what a LightningModule has."""

    def __init__(self, returns: str = "optimizer"):
        super().__init__()
        self.layer, self.returns = torch.nn.Linear(4, 2), returns

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        raise AssertionError("the pipeline does not call training_step")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(opt, 1)
        second = torch.optim.SGD(self.parameters(), lr=0.2)
        return {"optimizer": opt, "dict": {"optimizer": opt}, "dict+schedule": {"optimizer": opt,
                                                                               "lr_scheduler": schedule},
                "lists": ([opt], []), "lists+schedule": ([opt], [schedule]), "two": [opt, second],
                "groups": [{"params": list(self.parameters())}]}[self.returns]


@pytest.mark.parametrize("returns, said", [
    ("optimizer", None), ("dict", None), ("lists", None), ("groups", None),
    ("dict+schedule", "returned a dict with 'lr_scheduler' beside 'optimizer'"),
    ("lists+schedule", "returned 1 schedule(s) beside its optimizer(s)"),
    ("two", "returned 2 optimizers: the pipeline steps one")])
def test_configure_optimizers_returns_in_lightnings_shapes_are_taken_or_refused_by_name(compose_cfg, returns, said):
    from pipeline.config import parse_run_config
    from pipeline.job.build import build_optimizer
    from pipeline.targets import BuildError

    run = parse_run_config(compose_cfg("param_groups.method=configure_optimizers"))
    model = LightningStyle(returns)
    if said is None:
        optimizer = build_optimizer(run, model, rank=0, device=torch.device("cpu"))
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.param_groups[0]["lr"] == (0.1 if returns != "groups" else run.optimizer.lr)
    else:
        with pytest.raises(BuildError, match=re.escape(said)):
            build_optimizer(run, model, rank=0, device=torch.device("cpu"))


def test_a_model_with_lightnings_hooks_is_told_which_are_not_called(compose_cfg, caplog):
    from pipeline.config import parse_run_config
    from pipeline.job.build import say_unused_hooks

    say_unused_hooks(LightningStyle(), parse_run_config(compose_cfg()), rank=0)
    assert "model LightningStyle has training_step, which the pipeline does not call: it trains through forward()" \
        in caplog.text and "param_groups.method=configure_optimizers takes the model's own" in caplog.text


def test_no_decay_groups_cover_biases_norms_and_embeddings_once():
    from pipeline.job.build import no_decay_groups
    from pipeline.workloads.models import GPT, ResNet

    gpt = GPT(vocab_size=50, layers=2, heads=2, width=16, context_length=8, dropout=0.0)
    decay, no_decay = no_decay_groups(gpt)
    # tied output weight: the token embedding, once, in no_decay
    assert sum(p is gpt.tokens.weight for p in no_decay["params"]) == 1
    assert all(p.dim() == 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))
    assert {id(p) for p in decay["params"]} == {id(m.weight) for m in gpt.modules() if isinstance(m, torch.nn.Linear)
                                                and m.weight is not gpt.tokens.weight}
    resnet = ResNet((3, 32, 32), 10, depth=18, stem="auto", width=64)
    decay, no_decay = no_decay_groups(resnet)
    norms = [p for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert {id(p) for p in norms} <= {id(p) for p in no_decay["params"]}


def test_dataset_values_reach_any_config_node():
    from pipeline.targets import BuildError, dataset_facts, with_dataset_values

    class Data:
        num_classes, input_shape = 7, (3, 8, 8)

    facts = dataset_facts(Data())
    node = {"_target_": "x.Y", "config": {"num_labels": "${from_dataset:num_classes}",
                                          "sizes": ["${from_dataset:input_shape}", 1]}}
    assert with_dataset_values("model", node, facts) == {"_target_": "x.Y", "config": {"num_labels": 7,
                                                                                       "sizes": [[3, 8, 8], 1]}}
    with pytest.raises(BuildError, match=r"model.config.v=\$\{from_dataset:vocab_size\}: the train dataset has no "
                                         r"vocab_size \(it has: input_shape, num_classes\)"):
        with_dataset_values("model", {"config": {"v": "${from_dataset:vocab_size}"}}, facts)


def test_a_build_error_shows_the_innermost_cause():
    """A library's wrapper (transformers' "Could not import module", Hugging Face's DatasetGenerationError) is
    shown with what went wrong beneath it."""
    from pipeline.targets import BuildError, reported

    def make():
        try:
            raise ModuleNotFoundError("No module named 'torchvision.ops'")
        except ModuleNotFoundError as e:
            raise RuntimeError("Could not import module 'GPT2LMHeadModel'") from e

    with pytest.raises(BuildError, match=r"model._target_=x.Y could not be built at launch: RuntimeError: Could not "
                                         r"import module 'GPT2LMHeadModel' \(caused by ModuleNotFoundError: No module "
                                         r"named 'torchvision.ops'\)$"):
        reported("model", {"_target_": "x.Y"}, None, make)


def test_items_that_are_neither_pairs_nor_mappings_with_the_keys_are_named():
    from pipeline.job.data import ItemFormat

    fmt = ItemFormat("input_ids", "labels")
    assert fmt.describe((1, 2), "here") == "(input, target) pairs"
    with pytest.raises(TypeError, match=r"here: item 0 is a mapping with keys \['text', 'labels'\], without "
                                        r"input_ids; set io.input_key and io.target_key"):
        fmt.describe({"text": 1, "labels": 2}, "here")
    with pytest.raises(TypeError, match="item 0 is a 3-tuple, not an"):
        fmt.describe((1, 2, 3), "here")
    batch = fmt.split({"input_ids": 1, "labels": 2, "attention_mask": 3})
    assert (batch.inputs, batch.targets, batch.extra) == (1, 2, {"attention_mask": 3})
    # io.model_keys: only the listed keys reach the model; WebDataset's __key__ and __url__ never do
    row = {"input_ids": 1, "labels": 2, "attention_mask": 3, "id": 4, "__key__": "000004", "__url__": "a.tar"}
    assert fmt.split(row).extra == {"attention_mask": 3, "id": 4}
    only = ItemFormat("input_ids", "labels", ("attention_mask",))
    assert only.split(row).extra == {"attention_mask": 3}
    assert only.describe(row, "here") == ("mappings: input_ids the input, labels the targets, attention_mask passed "
                                          "to the model as keywords")
    with pytest.raises(TypeError, match=r"here: io.model_keys names token_type_ids, which item 0 \(keys"):
        ItemFormat("input_ids", "labels", ("token_type_ids",)).describe(row, "here")


def test_flops_are_counted_with_unused_parameters():
    from pipeline.job.flops import flops_per_sample

    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
    x = torch.randn(2, 4)
    flops = flops_per_sample(model, lambda: model["used"](x).sum(), 2, contextlib.nullcontext())
    assert flops == 2 * 4 * 2 + 2 * 4 * 2  # forward, and the weight's gradient (no input gradient)


def test_model_labels_name_the_innermost_model(compose_cfg):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from pipeline.config import parse_run_config, plain_config
    from pipeline.job.build import build_model, model_label
    from pipeline.workloads.datasets import SyntheticTokens

    data = SyntheticTokens(256, 16, 8, 8, 4, 0)
    inner = {"_target_": "transformers.GPT2LMHeadModel",
             "config": {"_target_": "transformers.GPT2Config", "n_layer": 3, "n_embd": 32, "n_head": 2}}
    wrapped = {"_target_": "tests.test_ecosystem.Wrapper", "model": inner}
    for node, label in ((inner, "GPT2LMHeadModel 3x32"), (wrapped, "GPT2LMHeadModel 3x32")):
        run = parse_run_config({**plain_config(compose_cfg("dataset=synthetic_tokens")), "model": node})
        assert model_label(run, build_model(run, data, rank=0)) == label


class Wrapper(torch.nn.Module):
    """A user's wrapper around another model: the label names the model inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits
