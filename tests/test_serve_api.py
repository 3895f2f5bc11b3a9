"""`zoo serve`'s OpenAI-compatible API, called with the official `openai` client against a real server process that
serves conftest's small trained MoE checkpoint (one server for the module)."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image
from serving import ServerProcess, data_url

KEY = "test-key-123"
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def server(demo_checkpoint, easy_vqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    images = easy_vqa["test"].images[:8]
    for i, image in enumerate(images):
        image.save(root / f"{i}.png")
    (tmp_path_factory.getbasetemp() / "outside.png").write_bytes((root / "0.png").read_bytes())
    running = ServerProcess(demo_checkpoint["path"], "--max-batch", "8", "--batch-wait-ms", "20", "--allowed-root",
                            str(root), "--max-image-bytes", str(MAX_BYTES), "--api-key", KEY,
                            log=tmp_path_factory.getbasetemp() / "serve-api.log")
    yield {"url": running.url, "root": root, "images": images, "name": str(demo_checkpoint["path"]),
           "model": demo_checkpoint["model"], "client": openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY,
                                                                       max_retries=0, timeout=120)}
    running.stop()


def ask(server, question: str, image_url: str, **options):
    return server["client"].chat.completions.create(model=server["name"], messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]}], **options)


QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle?", "is the shape blue?"]


def test_answers_equal_model_answer_with_usage(server):
    model = server["model"]
    for i, question in enumerate(QUESTIONS):
        image = server["images"][i]
        reply = ask(server, question, data_url(image))
        expected = model.answer([image], [question])[0]
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop" and reply.model == server["name"]
        prompt = len(model.encode_prompt(question)) - 1 + model.num_image_tokens
        completion = len(model.encode_answer(expected))  # the answer's tokens and its EOS
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
            (prompt, completion, prompt + completion)
    # a local file under the allowed root, as a path or a file:// URL
    path = server["root"] / "2.png"
    for url in (str(path), f"file://{path}", "2.png"):
        assert ask(server, QUESTIONS[0], url).choices[0].message.content == \
            model.answer([server["images"][2]], [QUESTIONS[0]])[0]
    assert [m.id for m in server["client"].models.list()] == [server["name"]]


def test_streamed_text_equals_the_plain_answer(server):
    for i, question in enumerate(QUESTIONS[:3]):
        url = data_url(server["images"][i])
        plain = ask(server, question, url)
        chunks = list(ask(server, question, url, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].usage.model_dump() == plain.usage.model_dump() and not chunks[-1].choices


def test_multi_turn_conversation_continues_after_the_answer(server):
    model, image = server["model"], server["images"][3]
    from zoo.chat import ChatSession

    chat = ChatSession(model, image)
    first, second = chat.ask(QUESTIONS[0]), chat.ask(QUESTIONS[2])
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": QUESTIONS[0]}]},
                {"role": "assistant", "content": first}, {"role": "user", "content": QUESTIONS[2]}]
    reply = server["client"].chat.completions.create(model=server["name"], messages=messages)
    assert reply.choices[0].message.content == second


def test_concurrent_requests_are_batched_and_greedy_answers_do_not_depend_on_the_batch(server):
    model = server["model"]
    cases = [(QUESTIONS[i % 4], server["images"][i % 8]) for i in range(16)]
    alone = [ask(server, q, data_url(im)).choices[0].message.content for q, im in cases[:4]]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda case: ask(server, case[0], data_url(case[1])).choices[0].message.content,
                                 cases))
    assert together[:4] == alone
    assert together == model.answer([im for _, im in cases], [q for q, _ in cases])
    metrics = httpx.get(f"{server['url']}/metrics").text
    largest = int(re.search(r"zoo_batch_size_max\{[^}]*\} (\d+)", metrics).group(1))
    assert largest > 1  # some requests shared a generate call


def test_seeded_sampling_through_the_api(server):
    url = data_url(server["images"][1])
    first = ask(server, QUESTIONS[1], url, temperature=1.5, seed=7, max_tokens=6)
    assert ask(server, QUESTIONS[1], url, temperature=1.5, seed=7, max_tokens=6).choices[0].message.content == \
        first.choices[0].message.content
    assert first.usage.completion_tokens <= 6
    draws = {ask(server, QUESTIONS[1], url, temperature=2.0, seed=s, max_tokens=3).choices[0].message.content
             for s in range(6)}
    assert len(draws) > 1  # sampling at a high temperature is not greedy


def test_concurrent_streams_arrive_token_by_token_each_to_its_own_request(server):
    url = data_url(server["images"][2])
    options = [{"temperature": 2.0, "seed": seed, "max_tokens": 6} for seed in range(8)]
    plain = [ask(server, QUESTIONS[0], url, **o).choices[0].message.content for o in options]
    with ThreadPoolExecutor(8) as pool:  # streamed together: one engine batch, one event hand-over per step
        streams = list(pool.map(lambda o: list(ask(server, QUESTIONS[0], url, stream=True, **o)), options))
    pieces = [[c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
              for chunks in streams]
    assert ["".join(p) for p in pieces] == plain
    assert [len(p) for p in pieces] == [len(text.split()) for text in plain]  # a chunk per generated word


def not_an_image() -> str:
    return "data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode()


def big_noise() -> str:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    return data_url(Image.fromarray(pixels))  # ~270 KB of PNG: over the server's 200,000-byte limit


def huge_canvas() -> str:
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # a few KB, 25 Mpixels: over the pixel limit
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD = [  # (what, request fields, status, words of the message)
    ("no image", {"messages": [{"role": "user", "content": "what color is it?"}]}, 400, "add an image_url part"),
    ("corrupt base64", {"image": "data:image/png;base64,@@not-base64@@"}, 400, "corrupt base64"),
    ("not an image", {"image": not_an_image()}, 400, "is not a readable image"),
    ("oversize bytes", {"image": big_noise()}, 413, "over 200,000 bytes"),
    ("oversize pixels", {"image": huge_canvas()}, 413, "5000x5000 pixels is over the limit"),
    ("unknown model", {"model": "no-such-model"}, 404, "'no-such-model' is not served here"),
    ("too many tokens", {"max_tokens": 100_000}, 400, "over the model's 256-token context"),
    ("outside the root", {"image": "../outside.png"}, 403, "is outside the allowed root"),
    ("absolute outside", {"image": "/etc/hostname"}, 403, "is outside the allowed root"),
    ("remote url", {"image": "https://example.com/a.png"}, 400, "remote URLs are not fetched"),
    ("bad temperature", {"temperature": 7}, 400, "temperature: expected a number from 0 to 2, got 7"),
    ("system message", {"messages": [{"role": "system", "content": "be brief"}]}, 400, "'system' messages are not"),
    ("unknown field", {"extra_body": {"best_of": 3}}, 400, "best_of: unknown field"),
    ("two images", {"second_image": True}, 400, "the model reads one image per conversation"),
]


@pytest.mark.parametrize("what, fields, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, what, fields, status,
                                                                                 words):
    fields = dict(fields)
    image = fields.pop("image", data_url(server["images"][0]))
    content = [{"type": "text", "text": QUESTIONS[0]}, {"type": "image_url", "image_url": {"url": image}}]
    if fields.pop("second_image", False):
        content.append(content[1])
    body = {"model": server["name"], "messages": [{"role": "user", "content": content}], **fields}
    with pytest.raises(openai.APIStatusError) as caught:
        server["client"].chat.completions.create(**body)
    assert caught.value.status_code == status
    error = caught.value.body
    assert words in error["message"], error
    good = ask(server, QUESTIONS[0], data_url(server["images"][0]))
    assert good.choices[0].message.content == server["model"].answer([server["images"][0]], [QUESTIONS[0]])[0]


def test_malformed_json_and_missing_key_are_refused(server):
    url = f"{server['url']}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    reply = httpx.post(url, content=b'{"model": "x", "messages": [', headers=headers)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        reply = httpx.get(f"{server['url']}/v1/models", headers=auth)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    reply = httpx.post(url, content=b'{"model": "x"}', headers={"Authorization": "Bearer wrong"})
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server['url']}/config").status_code == 401  # the page's API wants the login too
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0).models.list()
