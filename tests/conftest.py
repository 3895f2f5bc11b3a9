"""Shared fixtures. Everything is offline: tiny models built from configs, the easy-vqa data from its package."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import zoo  # noqa: E402


def tiny_config(**overrides) -> zoo.ModelConfig:
    """The demo model's config (16 image tokens) with optional top-level overrides."""
    config = zoo.get_config("tiny-llava")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# what torch.distributed / Lightning put in the environment when a test trains with ddp in this process; left behind,
# the next library that looks (accelerate, under lmms-eval) would try to join a process group that is gone
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_ENV_AT_START = {key: os.environ.get(key) for key in _DISTRIBUTED_ENV}


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    yield
    for key, value in _ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@torch.no_grad()
def randomise(module: torch.nn.Module, contains: str, std: float, seed: int) -> None:
    """Give every parameter whose name contains ``contains`` seeded N(0, std^2) values (routers that pick unevenly,
    LoRA B factors that are no longer zero), so a test sees the effect of weights that start neutral."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if contains in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="session")
def easy_vqa():
    from zoo.train import load_easy_vqa

    return {"train": load_easy_vqa("train"), "test": load_easy_vqa("test")}


@pytest.fixture(scope="session")
def trained_model(easy_vqa):
    """tiny-llava after a short real training run on easy-vqa (about 10 s on 2 cores)."""
    from zoo.train import TrainConfig, VQATrainingSet, fit

    torch.manual_seed(0)
    model = zoo.build(tiny_config())
    dataset = VQATrainingSet(model, easy_vqa["train"])
    first_batch = dataset.collate([dataset[i] for i in range(64)])
    with torch.no_grad():
        loss_before = model(**first_batch).loss.item()
    fit(model, dataset, TrainConfig(steps=200, batch_size=64, lr=3e-3), progress=False)
    model.eval()
    with torch.no_grad():
        loss_after = model(**first_batch).loss.item()
    return {"model": model, "loss_before": loss_before, "loss_after": loss_after}


@pytest.fixture(scope="session")
def demo_checkpoint(trained_model, easy_vqa, tmp_path_factory):
    """A small demo-style checkpoint: `trained_model` upcycled the MoE-LLaVA way and MoE-tuned for a few steps (what
    `make demo` ends with, at a short schedule), saved, reloaded, with a test image saved as PNG."""
    import copy

    from zoo.train import TrainConfig, VQASplit, VQATrainingSet, fit

    torch.manual_seed(0)
    model = copy.deepcopy(trained_model["model"])
    model.sparsify({"preset": "moe-llava"})
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)  # stage III: FFNs and routers
    train = easy_vqa["train"]  # the questions of the first 100 images
    few = VQASplit(train.images[:100], [s for s in train.samples if s.image < 100])
    fit(model, VQATrainingSet(model, few), TrainConfig(steps=10, batch_size=32, lr=2e-4), progress=False)
    path = model.save_pretrained(tmp_path_factory.mktemp("demo") / "model")
    image = tmp_path_factory.getbasetemp() / "shape.png"
    easy_vqa["test"].images[0].save(image)
    return {"path": path, "model": zoo.load(path), "image": image}


@pytest.fixture(scope="session")
def distributed(tmp_path_factory):
    """The suite's multi-process runs (tests/distributed_worker.py `run_all`: gloo processes on free ports), shared
    by the parallel-training, expert-parallel and DeepSpeed tests."""
    from distributed_worker import run_all

    runs = run_all(tmp_path_factory.mktemp("distributed"))
    print("\n" + "\n".join(f"{what}: {seconds:.0f} s" for what, seconds in runs["seconds"].items()))
    return runs
