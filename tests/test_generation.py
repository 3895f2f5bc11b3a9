"""Generation options (`zoo.generation`): sampling, top-k / top-p, repetition penalty, stop strings, budgets and
streaming, checked on a real tiny-llava whose LM head gives known logits, and greedy decoding left as it was."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from torch import nn
from transformers import GenerationConfig, TextIteratorStreamer

import zoo
from zoo.generation import TextStream, check_generation_config, sampling_config, set_fields, trim_at_stop

WORDS = ("red", "blue", "green", "circle", "yes")  # the five tokens with finite logits, most likely first
LOGITS = (2.0, 1.6, 0.9, 0.45, 0.1)
QUESTION = "is there a red shape?"  # holds "red": the repetition penalty sees the prompt


@pytest.fixture(scope="module")
def known():
    """tiny-llava whose LM head ignores its input: every position's logits are LOGITS on WORDS, -1e4 elsewhere."""
    torch.manual_seed(0)
    model = zoo.build(tiny_config()).eval()
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    ids = [model.tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    head = nn.Linear(model.lm.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[ids] = torch.tensor(LOGITS)
    model.lm.lm_head = head
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    return {"model": model, "ids": ids, "image": image}


def batch(known, rows: int, question: str = QUESTION):
    model = known["model"]
    # prompts of different lengths: left padding must not change any sequence's tokens
    prompts = [model.encode_prompt(question if i % 2 == 0 else "what shape is " + question) for i in range(rows)]
    ids, mask = model.collate_prompts(prompts)
    return model.vision.preprocess([known["image"]] * rows), ids, mask


def frequencies(tokens: torch.Tensor, ids: list[int]) -> list[float]:
    return [float((tokens == i).float().mean()) for i in ids]


def softmax(values) -> list[float]:
    return torch.tensor(values).softmax(0).tolist()


def test_sampling_follows_the_known_distribution_and_top_k_top_p_restrict_its_support(known):
    model, ids = known["model"], known["ids"]
    p = softmax(LOGITS)  # 0.43, 0.26, 0.16, 0.10, 0.06
    for top_p, support in ((0.6, 2), (0.8, 3)):  # nucleus: the fewest most likely tokens holding >= top_p
        assert sum(p[: support - 1]) < top_p <= sum(p[:support])
    groups = {  # options -> (support, expected frequencies); one batch of 32 sequences each, every row its own seed
        "plain": (sampling_config(1.0), ids, p),
        "top_k=2": (sampling_config(1.0, top_k=2), ids[:2], softmax(LOGITS[:2])),
        "top_p=0.6": (sampling_config(1.0, top_p=0.6), ids[:2], softmax(LOGITS[:2])),
        "top_p=0.8": (sampling_config(1.0, top_p=0.8), ids[:3], softmax(LOGITS[:3])),
        "temperature=3": (sampling_config(3.0), ids, softmax([v / 3.0 for v in LOGITS])),
    }
    rows = 32
    pixels, prompt, mask = batch(known, rows * len(groups))
    configs = [config for config, _, _ in groups.values() for _ in range(rows)]
    tokens = model.generate(pixels, prompt, mask, max_new_tokens=12, generation_config=configs,
                            seed=list(range(len(configs))))
    assert tokens.shape == (len(configs), 12)
    for g, (name, (_, support, expected)) in enumerate(groups.items()):
        drawn = tokens[g * rows:(g + 1) * rows]  # 384 draws
        assert set(drawn.unique().tolist()) == set(support), name
        for got, want in zip(frequencies(drawn, support), expected):
            assert got == pytest.approx(want, abs=0.06), name


def test_seeded_sampling_is_reproducible_whatever_the_batch(known):
    model = known["model"]
    pixels, prompt, mask = batch(known, 6)
    config = sampling_config(temperature=1.0, max_new_tokens=12)
    seeds = [11, 12, 13, 14, 15, 16]
    first = model.generate(pixels, prompt, mask, generation_config=config, seed=seeds)
    assert torch.equal(first, model.generate(pixels, prompt, mask, generation_config=config, seed=seeds))
    assert not torch.equal(first, model.generate(pixels, prompt, mask, generation_config=config, seed=[s + 100
                                                                                                       for s in seeds]))
    for i in (0, 3):  # alone, a sequence draws the same tokens as inside the batch
        alone = model.generate(pixels[i:i + 1], prompt[i:i + 1, mask[i].bool()], mask[i:i + 1, mask[i].bool()],
                               generation_config=config, seed=seeds[i])
        assert torch.equal(alone[0], first[i])
    # one batch may mix options: greedy rows take the argmax, sampled rows their own draws
    mixed = model.generate(pixels, prompt, mask, generation_config=[GenerationConfig(do_sample=False), config] * 3,
                           seed=seeds, max_new_tokens=12)
    assert (mixed[0::2] == known["ids"][0]).all() and torch.equal(mixed[1::2], first[1::2])


def test_temperature_towards_zero_is_greedy_and_greedy_is_the_default(known, trained_model, easy_vqa):
    model = known["model"]
    pixels, prompt, mask = batch(known, 8)
    greedy = model.generate(pixels, prompt, mask, max_new_tokens=10)
    assert (greedy == known["ids"][0]).all()
    cold = model.generate(pixels, prompt, mask, generation_config=sampling_config(1e-3, max_new_tokens=10),
                          seed=list(range(8)))
    assert torch.equal(cold, greedy)
    assert torch.equal(model.generate(pixels, prompt, mask, generation_config=sampling_config(0.0), max_new_tokens=10),
                       greedy)
    # on a trained model, the default path and explicit greedy options give the same tokens (EOS and pads included)
    trained, split = trained_model["model"], easy_vqa["test"]
    samples = split.samples[:12]
    ids, mask = trained.collate_prompts([trained.encode_prompt(s.question) for s in samples])
    pixels = trained.vision.preprocess([split.images[s.image] for s in samples])
    default = trained.generate(pixels, ids, mask, max_new_tokens=6)
    assert (default == trained.tokenizer.eos_token_id).any(1).all()  # answers end: the pads after EOS are covered
    for config in (GenerationConfig(do_sample=False), sampling_config(0.0), [sampling_config(0.0, stop=["zz"])] * 12):
        assert torch.equal(trained.generate(pixels, ids, mask, max_new_tokens=6, generation_config=config), default)


def test_repetition_penalty_counts_the_prompt_and_generated_tokens(known):
    model, (red, blue, *_) = known["model"], known["ids"]
    pixels, prompt, mask = batch(known, 4)
    config = GenerationConfig(repetition_penalty=2.0, max_new_tokens=4)
    got = model.generate(pixels, prompt, mask, generation_config=config)
    # "red" is in the prompt: 2.0 / 2 = 1.0 < blue's 1.6; then blue is penalised to 0.8 and red (1.0) wins over
    # green (0.9); both stay penalised once (transformers' rule), so red keeps winning
    assert got.tolist() == [[blue, red, red, red]] * 4
    other = model.generate(*batch(known, 2, "what shape is it?"), generation_config=config)
    assert other.tolist() == [[red, blue, red, red]] * 2  # red not in the prompt: it is chosen first


def test_stop_strings_and_per_sequence_budgets(known):
    model, (red, blue, *_) = known["model"], known["ids"]
    tokenizer = model.tokenizer
    pixels, prompt, mask = batch(known, 3)
    configs = [GenerationConfig(repetition_penalty=2.0, stop_strings=["red"], max_new_tokens=8),
               GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=5)]
    got = model.generate(pixels, prompt, mask, generation_config=configs)
    pad = tokenizer.pad_token_id
    assert got.tolist() == [[blue, red, pad, pad, pad], [red, red, red, pad, pad], [red] * 5]
    text = tokenizer.decode(got[0], skip_special_tokens=True)
    assert trim_at_stop(text, ["red"]) == ("blue ", True)
    with pytest.raises(ValueError, match=r"generation_config\[1\].top_p: expected 0 < top_p <= 1, got 1.5"):
        model.generate(pixels, prompt, mask, generation_config=[configs[0], GenerationConfig(top_p=1.5), configs[2]])
    with pytest.raises(ValueError, match="generation_config.num_beams: one sequence per prompt only"):
        check_generation_config(GenerationConfig(num_beams=4))
    with pytest.raises(ValueError, match="generation_config.no_repeat_ngram_size: not supported"):
        check_generation_config(GenerationConfig(no_repeat_ngram_size=2))
    with pytest.raises(ValueError, match="seed: 2 values for a batch of 3"):
        model.generate(pixels, prompt, mask, generation_config=configs, seed=[1, 2])


def test_set_fields_are_those_of_transformers_diff_dict():
    configs = [GenerationConfig(), sampling_config(), sampling_config(temperature=0.7, top_p=0.9, top_k=20, min_p=0.1,
                                                                      repetition_penalty=1.2, stop=["."]),
               GenerationConfig(num_beams=4, no_repeat_ngram_size=2, max_new_tokens=5, eos_token_id=[1, 2])]
    for config in configs:
        expected = set(config.to_diff_dict()) - {"transformers_version"}
        assert set(set_fields(config)) == expected
    assert set(set_fields(configs[2])) >= {"do_sample", "temperature", "top_k", "top_p", "min_p", "stop_strings"}


def test_streaming_pieces_join_to_the_answer(known):
    model, tokenizer = known["model"], known["model"].tokenizer
    pixels, prompt, mask = batch(known, 1)
    config = GenerationConfig(repetition_penalty=2.0, max_new_tokens=4)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(ids=model.generate(pixels, prompt, mask, streamer=streamer,
                                                                              generation_config=config)))
    worker.start()
    pieces = list(streamer)  # transformers' own streamer, fed token by token
    worker.join()
    assert "".join(pieces).strip() == tokenizer.decode(result["ids"][0], skip_special_tokens=True).strip() \
        == "blue red red red"
    stream = TextStream(tokenizer, stops=[" red r"])  # a stop string across tokens: "red" is held back, then cut
    sent = [stream.add(t) for t in result["ids"][0].tolist()]
    assert sent == ["blue", "", "", ""] and stream.stopped and stream.finish() == "" and stream.text == "blue"
    plain = TextStream(tokenizer)
    assert "".join([plain.add(t) for t in result["ids"][0].tolist()] + [plain.finish()]) == "blue red red red"
