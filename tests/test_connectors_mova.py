"""Multi-expert connectors: MoVA (MoV-Adapter, gate, coarse routing by the LM, two-pass inference that runs only the
picked experts), MouSi (per-expert MLPs or Q-Former fusion, position-id compression) and token compression
(pixel shuffle, average pooling, ``compress_mlp``)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_fusion import CLIP, CONVNEXT, SIGLIP, _experts, _images

import zoo
from zoo.config import ConfigError, ConnectorConfig, FusionConfig, LoRAExpertConfig, TokenizerConfig, from_dict
from zoo.connectors import build_connector
from zoo.connectors.compress import avg_pool_tokens, pixel_shuffle
from zoo.connectors.mousi import visual_position_ids
from zoo.connectors.mova import ExpertRouter, MoVAConnector, MoVAGate, MoVAInference
from zoo.lm.lora import lora_modules
from zoo.tokenizer import CORPORA, easy_vqa_text

# The easy-vqa vocabulary plus the routing answer words, so the tiny LM can say "c" or "a, b".
if "easy-vqa+routing" not in CORPORA.names():
    CORPORA.register("easy-vqa+routing", lambda: easy_vqa_text() + ["a b c , none"])

DESCRIPTIONS = ["CLIP: general images", "SigLIP: image-text matching", "ConvNeXt: local texture"]


def _connector(kind, options=None, projector="mlp2x_gelu"):
    return from_dict(ConnectorConfig, {"kind": kind, "projector": projector, "options": options or {}},
                     path="connector")


def _features(n, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, length, width, generator=g) for length, width in shapes]


def _fit(model, easy_vqa, steps, n=64, batch_size=16):
    """Train a few steps on an easy-vqa subset; the loss on a fixed batch before and after."""
    from zoo.train import TrainConfig, VQATrainingSet, fit

    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:n])
    dataset = VQATrainingSet(model, split)
    batch = dataset.collate([dataset[i] for i in range(batch_size)])
    with torch.no_grad():
        before = model.eval()(**batch).loss.item()
    fit(model, dataset, TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3), progress=False)
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    return before, after


# --- MoV-Adapter and gate -------------------------------------------------------------------------------------

def test_fresh_mov_adapter_returns_the_base_tokens_bit_for_bit():
    torch.manual_seed(0)
    connector = MoVAConnector(_connector("mova", {"blocks": 2, "top_k": 2}), [32, 48, 40], 16)
    features = _features(3, (16, 32), (9, 48), (4, 40))
    available = torch.ones(3, 2, dtype=torch.bool)
    text = torch.randn(3, 16)
    x, weights = connector.adapter(features, available, text)
    assert torch.equal(x, features[0])
    assert weights.shape == (2, 3, 2)
    out = connector(features)  # no pooling: the MLP of the base tokens
    assert torch.equal(out.tokens, connector.projector(features[0]).tokens)
    assert out.routing["gate_weights"].shape == (2, 3, 3) and not out.routing["gate_weights"][..., 0].any()


def test_gate_keeps_the_top_k_selected_experts_and_renormalises():
    torch.manual_seed(0)
    gate = MoVAGate(text_dim=6, width=8, num_experts=5, top_k=2)
    torch.nn.init.normal_(gate.mlp[-1].weight)  # the zero init would give equal scores
    text, x = torch.randn(4, 6), torch.randn(4, 7, 8)
    available = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = gate(text, x, available)
    logits = gate.mlp(torch.cat([text, x.mean(1)], -1))
    for row in range(4):
        allowed = available[row].nonzero().flatten()
        kept = torch.zeros(5, dtype=torch.bool)
        if len(allowed):
            probs = logits[row, allowed].softmax(-1)
            kept[allowed[probs.topk(min(2, len(allowed))).indices]] = True
        assert torch.equal(weights[row] > 0, kept)
        assert not weights[row][~kept].any()
        if kept.any():
            torch.testing.assert_close(weights[row].sum(), torch.tensor(1.0), rtol=0, atol=1e-6)
            expected = logits[row, kept].softmax(-1)  # renormalised softmax over the kept ones
            torch.testing.assert_close(weights[row, kept], expected, rtol=0, atol=1e-6)
    assert (weights > 0).sum(1).tolist() == [2, 1, 2, 0]


def test_mova_pools_576_base_tokens_to_144_by_area_pooling():
    torch.manual_seed(0)
    connector = MoVAConnector(_connector("mova", {"tokens": 144, "blocks": 1}), [8, 6], 10)
    features = _features(2, (576, 8), (64, 6))
    out = connector(features)
    assert out.tokens.shape == (2, 144, 10)
    means = features[0].view(2, 12, 2, 12, 2, 8).mean((2, 4)).reshape(2, 144, 8)
    torch.testing.assert_close(out.tokens, connector.projector(means).tokens, rtol=0, atol=1e-6)
    assert connector(features, num_tokens=36).tokens.shape == (2, 36, 10)


def test_mova_runs_only_the_selected_experts_modules():
    torch.manual_seed(0)
    connector = MoVAConnector(_connector("mova", {"blocks": 1, "top_k": 2}), [8, 6, 4], 10)
    for block in connector.adapter.blocks:
        torch.nn.init.normal_(block.gate.mlp[-1].weight)
    calls = {1: 0, 2: 0}
    for e, extractor in zip((1, 2), connector.adapter.blocks[0].extractors):
        extractor.register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
    features = _features(2, (16, 8), (9, 6), (4, 4))
    out = connector([features[0], features[1], None], selected=[{1}, {0}])
    assert calls == {1: 1, 2: 0}
    gate = out.routing["gate_weights"][0]
    assert gate[0].tolist() == [0.0, 1.0, 0.0] and not gate[1].any()
    # an image with no routed expert gets the base path only: the same tokens as a no-expert selection
    alone = connector([features[0], None, None], selected=[set(), set()]).tokens
    torch.testing.assert_close(out.tokens[1], alone[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"selected\[0\]: expert 2 is selected but its features were not given"):
        connector([features[0], features[1], None], selected=[{2}, set()])
    with pytest.raises(ValueError, match=r"selected: expected one expert set per image \(2\), got 1"):
        connector(features, selected=[{1}])


def test_mova_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^connector\.options\.top_k: expected 1-2"):
        MoVAConnector(_connector("mova", {"top_k": 3}), [8, 6, 4], 10)
    with pytest.raises(ConfigError, match=r"^connector\.options\.blokcs: unknown option for connector kind 'mova'"):
        MoVAConnector(_connector("mova", {"blokcs": 1}), [8, 6], 10)
    with pytest.raises(ConfigError, match=r"^connector\.options\.tokens: expected a square number of tokens \(e\.g\. 144\), got 10"):
        MoVAConnector(_connector("mova", {"tokens": 10}), [8, 6], 10)
    with pytest.raises(ConfigError, match=r"^connector\.options\.descriptions: expected one description \(a string\)"):
        MoVAConnector(_connector("mova", {"descriptions": ["x"]}), [8, 6], 10)
    with pytest.raises(ConfigError, match=r"^connector\.options\.default_experts: routing label 'Q'"):
        MoVAConnector(_connector("mova", {"default_experts": ["Q"]}), [8, 6], 10)
    with pytest.raises(ValueError, match=r"^connector\.kind: 'mova' needs several vision experts"):
        build_connector(_connector("mova"), 8, 10)


# --- coarse routing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("A, C", {0, 2}), ("A and C", {0, 2}), ("c", {2}), ("C,A", {0, 2}), ("(b).", {1}), ("a; b", {0, 1}),
    ("none", set()), ("NONE", set()),
])
def test_router_parses_answers(answer, expected):
    router = ExpertRouter(DESCRIPTIONS, default_experts=[1], max_selected=3)
    assert router.parse(answer) == expected
    assert router.fallbacks == 0


@pytest.mark.parametrize("garbage", ["the red one", "", "A, Z", "D", "7", "A. CLIP"])
def test_router_falls_back_on_garbage_and_counts_it(garbage):
    router = ExpertRouter(DESCRIPTIONS, default_experts=["B", "C"], max_selected=3)
    assert router.parse(garbage) == {1, 2}
    assert router.parse("a") == {0}
    assert router.fallbacks == 1


def test_router_keeps_the_first_letters_and_builds_prompts_and_targets():
    router = ExpertRouter(DESCRIPTIONS, default_experts=[0], max_selected=2)
    assert router.parse("C, A, B") == {0, 2}
    prompt = router.prompt("what color is the shape?")
    assert "pick at most 2 models" in prompt
    assert ("\nModel pool:\nA. CLIP: general images\nB. SigLIP: image-text matching\nC. ConvNeXt: local texture"
            "\n\nQuestion:\nwhat color is the shape?") in prompt
    assert router.target_text(["c", "A"]) == "A, C"
    assert router.target_text([2, "C"]) == "C"
    assert router.target_text([]) == "none"
    assert router.training_pair("q?", ["B"]) == (router.prompt("q?"), "B")
    with pytest.raises(ValueError, match=r"routing label 'D': expected a letter A-C or an expert index 0-2"):
        router.target_text(["D"])
    stub = {router.prompt("q1"): "b and c", router.prompt("q2"): "no idea"}
    assert router.route(["q1", "q2"], lambda prompts: [stub[p] for p in prompts]) == [{1, 2}, {0}]
    assert router.fallbacks == 1


# --- a tiny MoVA model end to end -----------------------------------------------------------------------------

def test_tiny_mova_trains_routes_with_its_lm_and_runs_only_the_picked_experts(easy_vqa):
    torch.manual_seed(0)
    config = tiny_config(name="tiny-mova")
    config.vision = _experts(CLIP, SIGLIP, CONVNEXT)  # 4x4 base, 3x3, 2x2 token grids
    config.fusion = FusionConfig(mode="sequence", resample="none")
    config.connector = _connector("mova", {"tokens": 4, "routing_tokens": 1, "blocks": 1, "top_k": 1,
                                           "descriptions": DESCRIPTIONS, "default_experts": ["B"]})
    config.tokenizer = TokenizerConfig(train_on="easy-vqa+routing")
    model = zoo.build(config)
    before, after = _fit(model, easy_vqa, steps=4)
    assert after < before

    mova = MoVAInference(model)
    images = _images(2)
    questions = ["what color is the shape?", "what shape is in the image?"]
    pixels = model.vision.preprocess(images)
    with torch.no_grad():
        everything = mova.encode(pixels)  # every expert on every image: the ZooModel path
        torch.testing.assert_close(everything.tokens, model.encode_images(pixels).tokens, rtol=0, atol=0)
        ids, mask = model.collate_prompts([model.encode_prompt(q) for q in questions])
        reference = model.tokenizer.batch_decode(model.generate(pixels, ids, mask, 6), skip_special_tokens=True)
        assert mova.generate(everything.tokens, questions, 6) == [s.strip() for s in reference]

    calls = {i: [] for i in range(3)}
    for i, expert in enumerate(model.vision.experts):
        expert.register_forward_hook(lambda module, args, out, i=i: calls[i].append(len(args[0])))
    with torch.no_grad():
        mova.encode(pixels, [{1}, set()])
    assert calls == {0: [2], 1: [1], 2: []}  # expert 1 on the one image that picked it, expert 2 never

    # supervised routing (the routing LoRA's task, here on the whole LM): every question -> expert C
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = mova.routing_loss(pixels, questions, [["C"], ["c"]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
    ids, labels = mova.routing_example(questions[0], ["C"])
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert model.tokenizer.decode(supervised, skip_special_tokens=True) == "c"

    # two passes with the real LM: pass 1 runs the base only, pass 2 the base and the picked expert C
    for i in calls:
        calls[i].clear()
    answers, selected = mova.answer(images, questions, max_new_tokens=4)
    assert selected == [{2}, {2}] and mova.router.fallbacks == 0
    assert calls == {0: [2, 2], 1: [], 2: [2]}
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# --- MouSi ----------------------------------------------------------------------------------------------------

def test_mousi_mlp_fusion_is_per_expert_mlps_concatenated():
    torch.manual_seed(0)
    connector = build_connector(_connector("mousi"), [8, 12], 16)
    features = _features(2, (16, 8), (9, 12))
    out = connector(features)
    manual = []
    for projector, f in zip(connector.projectors, features):
        first, _, second = projector.layers
        manual.append(second(torch.nn.functional.gelu(first(f))))
    torch.testing.assert_close(out.tokens, torch.cat(manual, 1), rtol=0, atol=0)
    assert out.expert_ids.tolist() == [0] * 16 + [1] * 9
    assert torch.equal(out.routing["position_ids"], torch.arange(25))


@pytest.mark.parametrize("scheme, expected", [
    ("all", [0] * 16 + [1] * 9),
    ("row", [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3 + [5] * 3 + [6] * 3),
])
def test_mousi_position_sharing(scheme, expected):
    connector = build_connector(_connector("mousi", {"position_sharing": scheme}), [8, 12], 16)
    ids = connector(_features(1, (16, 8), (9, 12))).routing["position_ids"]
    assert ids.tolist() == expected
    assert ids.unique().numel() == (2 if scheme == "all" else 4 + 3)


def test_visual_position_ids_on_a_sam_grid():
    ids, following = visual_position_ids(64, 64, "row", start=10)
    assert ids.unique().numel() == 64 and following == 10 + 64 and ids[:64].eq(10).all()
    ids, following = visual_position_ids(64, 64, "all", start=10)
    assert ids.unique().tolist() == [10] and following == 11
    ids, following = visual_position_ids(2, 3, "none")
    assert ids.tolist() == list(range(6)) and following == 6


def test_mousi_qformer_fusion_compresses_all_experts_to_the_queries():
    torch.manual_seed(0)
    connector = build_connector(_connector("mousi", {"fusion": "qformer", "queries": 4, "layers": 2,
                                                     "position_sharing": "row"}), [8, 12], 16)
    features = [f.requires_grad_() for f in _features(2, (16, 8), (9, 12))]
    out = connector(features)
    assert out.tokens.shape == (2, 4, 16) and out.expert_ids is None
    assert out.routing["position_ids"].tolist() == [0, 0, 1, 1]
    out.tokens.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    with pytest.raises(ConfigError, match=r"^connector\.options\.fusion: expected 'mlp' or 'qformer'"):
        build_connector(_connector("mousi", {"fusion": "concat"}), [8, 12], 16)
    with pytest.raises(ValueError, match=r"connector\.options\.position_sharing \('row'\) on group 1: 8 tokens"):
        build_connector(_connector("mousi", {"position_sharing": "row"}), [8, 12], 16)(_features(1, (16, 8), (8, 12)))


def test_tiny_mousi_model_runs_with_sequence_fusion():
    torch.manual_seed(0)
    config = tiny_config(name="tiny-mousi")
    config.vision = _experts(CLIP, CONVNEXT)
    config.fusion = FusionConfig(mode="sequence", resample="none")
    config.connector = _connector("mousi", {"position_sharing": "all"})
    model = zoo.build(config).eval()
    ids, mask = model.collate_prompts([model.encode_prompt("what shape is this?")])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=model.vision.preprocess(_images(1)))
    assert out.image_mask.sum() == 16 + 4
    assert out.routing["position_ids"].tolist() == [0] * 16 + [1] * 4


# --- token compression ----------------------------------------------------------------------------------------

def test_pixel_shuffle_by_hand():
    index = torch.arange(16.0)
    tokens = torch.stack([index, 100 + index], -1).unsqueeze(0)  # [1, 16, 2]: channel c holds 100 c + index
    out = pixel_shuffle(tokens, 4, 2)
    assert out.shape == (1, 4, 8)
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    expected = [[v for i in block for v in (i, 100 + i)] for block in blocks]
    assert out[0].tolist() == expected
    with pytest.raises(ValueError, match="pixel_shuffle: the 3x3 grid is not divisible by factor 2"):
        pixel_shuffle(torch.zeros(1, 9, 2), 3, 2)


def test_avg_pool_4x4_to_2x2_is_the_block_means():
    tokens = torch.arange(32.0).view(1, 16, 2)
    out = avg_pool_tokens(tokens, 4, 2)
    grid = tokens.view(4, 4, 2)
    expected = [grid[r:r + 2, c:c + 2].mean((0, 1)).tolist() for r in (0, 2) for c in (0, 2)]
    assert out[0].tolist() == expected
    assert out[0, 0].tolist() == [(0 + 2 + 8 + 10) / 4, (1 + 3 + 9 + 11) / 4]


def test_compress_mlp_shapes_and_errors():
    features = _features(2, (16, 8))[0]
    shuffle = build_connector(_connector("compress_mlp"), 8, 12)
    assert shuffle.projector.layers[0].in_features == 32
    assert shuffle(features).tokens.shape == (2, 4, 12)
    pooled = build_connector(_connector("compress_mlp", {"method": "avg_pool", "tokens": 1}), 8, 12)
    torch.testing.assert_close(pooled(features).tokens, pooled.projector(features.mean(1, keepdim=True)).tokens,
                               rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match=r"^connector\.options\.method: expected 'pixel_shuffle' or 'avg_pool'"):
        build_connector(_connector("compress_mlp", {"method": "max"}), 8, 12)
    with pytest.raises(ConfigError, match=r"^connector\.options\.factor: expected int, got '2'"):
        build_connector(_connector("compress_mlp", {"factor": "2"}), 8, 12)


def test_tiny_model_with_compress_mlp_trains(easy_vqa):
    torch.manual_seed(0)
    config = tiny_config(name="tiny-compress")
    config.vision.frozen = True  # keeps the steps cheap: only the connector and the LM train
    config.connector = _connector("compress_mlp", {"method": "pixel_shuffle", "factor": 2})
    model = zoo.build(config)
    ids, mask = model.collate_prompts([model.encode_prompt("what shape is this?")])
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=mask, pixel_values=model.vision.preprocess(_images(1)))
    assert out.image_mask.sum() == 4  # 4x4 tokens -> 2x2
    before, after = _fit(model, easy_vqa, steps=4)
    assert after < before


def test_model_gives_shared_image_positions_one_position_id():
    torch.manual_seed(0)
    config = tiny_config(name="tiny-mousi")
    config.vision = _experts(CLIP, CONVNEXT)
    config.fusion = FusionConfig(mode="sequence", resample="none")
    config.connector = _connector("mousi", {"position_sharing": "all"})
    model = zoo.build(config).eval()
    prompt = model.encode_prompt("what shape is this?")  # <s> <image> what shape is this ?
    ids, mask = model.collate_prompts([prompt, prompt[:4]])  # left padded
    pixels = model.vision.preprocess(_images(2))
    out = model.encode_images(pixels)
    sp = model.splice(ids, out.tokens, mask, image_positions=out.routing["position_ids"])
    assert sp.position_ids[0].tolist() == [0] + [1] * 16 + [2] * 4 + [3, 4, 5, 6, 7]
    left = model.splice(ids, out.tokens, mask, padding_side="left", image_positions=out.routing["position_ids"])
    assert left.position_ids[1, -1 - 20 - 2:].tolist() == [0] + [1] * 16 + [2] * 4 + [3, 4]
    with torch.no_grad():  # the forward and generate paths read the ids from the connector
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        manual = model.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                          position_ids=sp.position_ids).logits
        torch.testing.assert_close(logits, manual, rtol=0, atol=0)
        assert model.generate(pixels, ids, mask, 3).shape[0] == 2
    with pytest.raises(ValueError, match=r"image_positions: expected \[20\] ids from 0 in steps of 0 or 1"):
        model.splice(ids, out.tokens, mask, image_positions=torch.arange(20) * 2)


@pytest.mark.parametrize("connector, expected", [
    ({"kind": "compress_mlp", "options": {"method": "pixel_shuffle", "factor": 2}}, 4),
    ({"kind": "compress_mlp", "options": {"method": "avg_pool", "tokens": 4}}, 4),
    ({"kind": "mlp"}, 16),
])
def test_the_model_counts_the_image_tokens_the_connector_emits(connector, expected):
    config = tiny_config()
    config.connector = from_dict(ConnectorConfig, connector, path="connector")
    model = zoo.build(config).eval()
    assert model.num_image_tokens == expected
    image = Image.new("RGB", (64, 64), (10, 200, 10))
    ids, mask = model.collate_prompts([model.encode_prompt("what color is the shape?")])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=model.vision.preprocess([image]))
    assert int(out.image_mask.sum()) == expected


# --- the question reaches the gate; the routing LoRA ------------------------------------------------------------

def _tiny_mova(lora=None, routing_adapter=None):
    torch.manual_seed(0)
    config = tiny_config(name="tiny-mova")
    config.vision = _experts(CLIP, SIGLIP, CONVNEXT)
    config.fusion = FusionConfig(mode="sequence", resample="none")
    options = {"tokens": 4, "routing_tokens": 1, "blocks": 1, "top_k": 1, "descriptions": DESCRIPTIONS,
               "default_experts": ["B"]}
    if routing_adapter is not None:
        options["routing_adapter"] = routing_adapter
    config.connector = _connector("mova", options)
    config.tokenizer = TokenizerConfig(train_on="easy-vqa+routing")
    if lora is not None:
        config.lm.lora = from_dict(LoRAExpertConfig, lora, path="lm.lora")
    return zoo.build(config)


def test_the_gate_reads_each_prompts_question_but_never_its_answer():
    model = _tiny_mova().eval()
    seen = []
    model.connector.adapter.blocks[0].gate.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    images = _images(2)
    pixels = model.vision.preprocess(images)
    prompts = [model.encode_prompt(q) for q in ("what color is the shape?", "is there a circle?")]
    answers = [model.encode_answer(a) for a in ("red", "no")]
    ids, mask = model.collate_prompts([p + a for p, a in zip(prompts, answers)], padding_side="right")
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
        embed = model.lm.get_input_embeddings()
        for i, p in enumerate(prompts):  # the mean embedding of the prompt's text tokens, no image, no answer
            text = [t for t in p if t != model.image_token_id]
            torch.testing.assert_close(seen[0][i], embed(torch.tensor(text)).mean(0))
        answer_ids = model.collate_prompts(prompts)
        model.generate(pixels, *answer_ids, max_new_tokens=1)
    torch.testing.assert_close(seen[1], seen[0])  # generation from the prompt gives the gate the same text


def test_the_routing_pass_uses_the_routing_lora_only():
    lora = {"mode": "task", "task_names": ["answer", "route"], "targets": ["q_proj", "v_proj"]}
    model = _tiny_mova(lora, routing_adapter="route")
    mova = MoVAInference(model)
    pixels = model.vision.preprocess(_images(2))
    questions = ["what color is the shape?", "what shape is in the image?"]
    loss = mova.routing_loss(pixels, questions, [["C"], ["B"]])
    loss.backward()
    for layer in lora_modules(model).values():
        assert layer.lora_A[0].grad is None and layer.lora_B[0].grad is None  # "answer" untouched
        assert layer.lora_B[1].grad is not None and layer.lora_B[1].grad.abs().sum() > 0  # "route" learns
    with pytest.raises(ValueError, match="routing_adapter: 'routing' is not a LoRA task adapter of the LM"):
        MoVAInference(_tiny_mova(lora, routing_adapter="routing"))
    with pytest.raises(ValueError, match=r"its task adapters: none \(no lm.lora of mode task\)"):
        MoVAInference(_tiny_mova(None, routing_adapter="route"))
