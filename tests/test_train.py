"""The Lightning module's optimizer: per-part learning rates, frozen parts hold no optimizer state."""

import pytest
import torch
from conftest import tiny_config
from image_faults import write_unusable

import zoo
from zoo.train import TrainConfig, ZooLightningModule


def test_optimizer_groups_scale_lr_per_part_and_skip_frozen_parts():
    config = tiny_config()
    config.vision.frozen = True
    model = zoo.build(config)
    assert not any(p.requires_grad for p in model.vision.parameters())
    module = ZooLightningModule(model, TrainConfig(lr=1e-3, lr_scale={"connector": 10.0}))
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.vision.parameters())
    assert all(id(p) in in_optimizer for p in model.connector.parameters())
    assert all(id(p) in in_optimizer for p in model.lm.parameters())
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}  # peak lr, before warm-up scaling
    assert lrs["connector/decay"] == pytest.approx(1e-2) and lrs["lm/decay"] == pytest.approx(1e-3)
    assert not model.vision.training  # a frozen expert stays in eval mode
    model.train()
    assert not model.vision.training and model.lm.training
    with pytest.raises(ValueError, match=r"lr_scale: unknown part\(s\) \['vison'\]"):
        ZooLightningModule(model, TrainConfig(lr_scale={"vison": 2.0})).configure_optimizers()


def test_frozen_vision_is_bit_identical_after_a_step(easy_vqa):
    from zoo.train import VQATrainingSet, fit

    config = tiny_config()
    config.vision.frozen = True
    torch.manual_seed(0)
    model = zoo.build(config)
    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:64])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, VQATrainingSet(model, split), TrainConfig(steps=2, batch_size=32, lr=1e-2), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("vision."))
    assert not torch.equal(before["connector.layers.0.weight"], after["connector.layers.0.weight"])


def test_dihedral_augmentation_gives_one_of_the_eight_symmetries():
    from zoo.train.data import dihedral

    torch.manual_seed(0)
    images = torch.randn(32, 3, 8, 8)
    out = dihedral(images)
    seen = set()
    for src, got in zip(images, out):
        variants = [torch.rot90(src, k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        matches = [i for i, v in enumerate(variants) if torch.equal(v, got)]
        assert matches, "output is not a flip/rotation of its input"
        seen.add(matches[0])
    assert len(seen) >= 6  # the symmetry is drawn at random


def test_multi_turn_packing_supervises_every_answer_of_the_image(easy_vqa):
    from zoo.train import VQATrainingSet

    model = zoo.build(tiny_config())
    split = easy_vqa["train"]
    split = type(split)(split.images, split.samples[:60])
    ds = VQATrainingSet(model, split, turns_per_sample=4)
    assert ds.num_questions == 60 and len(ds) == len({s.image for s in split.samples})
    torch.manual_seed(0)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    eos, image_token = model.tokenizer.eos_token_id, model.image_token_id
    for row, group in enumerate(ds.groups):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids.count(image_token) == 1
        answers = model.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100 and t != eos]).split()
        expected = [split.samples[i].answer for i in group]
        assert len(answers) == min(4, len(group)) == sum(t == eos and lab == eos for t, lab in zip(ids, labels))
        assert all(a in expected for a in answers)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    again = ds[0]
    assert again[0] == ds.image_of(0)


# --- strategies, precision, gradient checkpointing ------------------------------------------------------------

def test_strategies_by_name_and_their_errors():
    from zoo.config import ConfigError
    from zoo.train.parallel import ZooParallelStrategy, shard_units
    from zoo.train.strategy import build_strategy, frozen_parts

    config = tiny_config()
    config.vision.frozen = True
    model = zoo.build(config)
    assert build_strategy("auto", model) == "auto"
    assert frozen_parts(model) == [model.vision]  # kept whole on every rank, out of FSDP
    with pytest.raises(ConfigError, match=r"^train\.strategy: expected one of auto, ddp, fsdp, deepspeed_stage_2"):
        build_strategy("zero2", model)
    fsdp = build_strategy("fsdp", model, devices=2)  # FSDP2 on CPU too (gloo)
    assert isinstance(fsdp, ZooParallelStrategy) and fsdp.shard and fsdp.expert_parallel == 1
    # one FSDP unit per LM decoder layer and the connector; a frozen tower has none
    assert [type(u).__name__ for u in shard_units(model)] == ["MLPProjector", "LlamaDecoderLayer", "LlamaDecoderLayer"]
    trainable_tower = zoo.build(tiny_config())  # ConvNeXt blocks of a trainable tower are units too
    assert sum(type(u).__name__ == "ConvNeXtBlock" for u in shard_units(trainable_tower)) == 6  # stages 0-2: 2+2+2
    with pytest.raises(ConfigError, match=r"^train\.devices: a number of devices per node is needed here, got 'auto'"):
        build_strategy("fsdp", model, devices="auto")
    sparse = zoo.build("tiny-moe-llava")
    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 2 does not divide the world size 3"):
        build_strategy("ddp", sparse, expert_parallel=2, devices=3)
    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 8 does not divide the 4 experts of "
                                          r"lm\.model\.layers\.0\.mlp\.moe \(num_experts\)"):
        build_strategy("fsdp", sparse, expert_parallel=8, devices=8)
    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 2 runs with strategy ddp or fsdp .* 'auto'"):
        build_strategy("auto", sparse, expert_parallel=2, devices=2)
    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 2, but the model has no MoE layer"):
        build_strategy("ddp", model, expert_parallel=2, devices=2)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-moe-llava"])
def test_gradient_checkpointing_gives_the_same_gradients(easy_vqa, name):
    """Also for a sparse LM: its layers read the padding and modality masks of the forward again when the backward
    recomputes them (they used to be reset after the call, so recomputation routed padding too and failed)."""
    from zoo.train import VQATrainingSet
    from zoo.train.strategy import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = zoo.build(tiny_config() if name == "tiny-llava" else name)
    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:8])
    ds = VQATrainingSet(model, split)
    batch = ds.collate([ds[i] for i in range(8)])

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    enable_gradient_checkpointing(model)
    assert model.lm.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_accumulation_steps_every_n_batches(easy_vqa):
    from zoo.train import VQATrainingSet, fit

    torch.manual_seed(0)
    model = zoo.build(tiny_config())
    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:256])
    config = TrainConfig(steps=6, batch_size=16, lr=3e-3, accumulate_grad_batches=2)
    module = fit(model, VQATrainingSet(model, split), config, progress=False)
    assert len(module.losses) == 12  # 6 optimizer steps x 2 accumulated batches
    assert module.trainer.global_step == 6
    assert float(module.losses[-1]) < float(module.losses[0])


def test_bf16_mixed_precision_runs_the_lm_in_bf16_and_keeps_fp32_weights(easy_vqa):
    """`precision: bf16-mixed` (Lightning's autocast, CPU and CUDA alike): the LM's matmuls run in bf16, the
    weights and their optimizer state stay fp32, and the loss still falls."""
    from zoo.train import VQATrainingSet, fit

    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:256])
    torch.manual_seed(0)
    model = zoo.build(tiny_config())
    dataset = VQATrainingSet(model, split)
    seen = []
    hook = model.lm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    config = TrainConfig(steps=6, batch_size=16, lr=3e-3, precision="bf16-mixed")
    module = fit(model, dataset, config, progress=False)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast reached the LM head in every step
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = module.trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert float(module.losses[-1]) < float(module.losses[0])


def test_questions_about_unusable_easy_vqa_images_are_counted_skips_and_the_rest_trains(tmp_path):
    """easy-vqa's reader on the package's own questions and images, five images swapped for files the models cannot
    take: their questions are skips naming the file, every other question is trained on."""
    import easy_vqa

    from zoo.train import VQATrainingSet, fit
    from zoo.train.data import read_vqa_split

    questions = [q for q in zip(*easy_vqa.get_train_questions()) if q[2] < 20]  # (question, answer, image id)
    paths = {i: p for i, p in easy_vqa.get_train_image_paths().items() if i < 20}
    unusable = write_unusable(tmp_path)
    for image_id, (path, _) in enumerate(unusable.values()):
        paths[image_id] = path
    split = read_vqa_split(questions, paths, "easy-vqa/train")
    bad = {f"easy-vqa/train/{n}" for n, (_, _, image_id) in enumerate(questions) if image_id < len(unusable)}
    assert {i for ids in split.skipped.by_reason.values() for i in ids} == bad
    for path, words in unusable.values():
        assert any(words in reason and str(path) in reason for reason in split.skipped.by_reason)
    assert len(split.images) == 20 - len(unusable) and len(split.samples) == len(questions) - len(bad)
    # the captions task of a recipe (the demo's open_clip pretraining) counts the same skips and captions the rest
    from zoo.train import recipe
    from zoo.train.captions import caption_images
    from zoo.train.data import SkipCounter

    skipped = SkipCounter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "load_easy_vqa", lambda name, limit=None: split)
        captions = recipe.build_source(recipe.SourceConfig(kind="easy-vqa", task="captions"), skipped)
    assert {i for ids in skipped.by_reason.values() for i in ids} >= bad
    assert all(any(str(path) in reason for reason in skipped.by_reason) for path, _ in unusable.values())
    assert len(captions) == len(caption_images(split)) > 0
    assert all(any(c.images[0] is image for image in split.images) for c in captions)
    model = zoo.build(tiny_config())
    data = VQATrainingSet(model, split)
    assert data.num_questions == len(questions) - len(bad) and data.skipped.total == len(bad)
    module = fit(model, data, TrainConfig(steps=2, batch_size=16, lr=1e-3), progress=False)
    assert len(module.losses) == 2
