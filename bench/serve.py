"""`zoo serve` under load: 32 concurrent clients against the same requests sent one after another, through the
official `openai` client, on one server process (dynamic batching up to --max-batch).

    .venv/bin/python bench/serve.py                          # runs/demo/model, 128 requests per phase
    .venv/bin/python bench/serve.py --model runs/x/model --requests 256 --clients 32 --max-batch 32

Prints requests per second, latency p50 / p95 of each phase and the throughput ratio (target >= 4x sequential from
batching), and checks that every request was answered and that each concurrent answer equals the sequential one
(greedy answers do not depend on the batch they ran in).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import openai  # noqa: E402
from serving import ServerProcess, data_url  # noqa: E402

QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle in the image?",
             "is the shape green?"]


def requests(count: int) -> list[tuple[str, str]]:
    """``count`` (question, image data URL) pairs over easy-vqa test images."""
    from easy_vqa import get_test_image_paths
    from PIL import Image

    paths = get_test_image_paths()
    ids = sorted(paths)
    return [(QUESTIONS[i % len(QUESTIONS)], data_url(Image.open(paths[ids[i]]).convert("RGB"))) for i in range(count)]


def timed_ask(client: openai.OpenAI, model: str, question: str, url: str, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}])
    return time.perf_counter() - start, reply.choices[0].message.content


def phase(client, model: str, work: list[tuple[str, str]], clients: int, max_tokens: int):
    """(wall seconds, latencies, answers) of ``work`` sent by ``clients`` threads (1: one after another)."""
    start = time.perf_counter()
    if clients == 1:
        results = [timed_ask(client, model, q, url, max_tokens) for q, url in work]
    else:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda item: timed_ask(client, model, item[0], item[1], max_tokens), work))
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/model", help="checkpoint dir or catalogue name to serve")
    parser.add_argument("--requests", type=int, default=128, help="requests per phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="zoo-bench-serve-")) / "server.log"
    print(f"starting zoo serve {args.model} (--max-batch {args.max_batch}); log: {log}", flush=True)
    server = ServerProcess(args.model, "--max-batch", str(args.max_batch), log=log)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
        work = requests(args.requests)
        phase(client, args.model, work[:4], 1, args.max_tokens)  # warm-up
        rows = {}
        for name, clients in (("sequential", 1), (f"{args.clients} concurrent clients", args.clients)):
            print(f"{name}: {len(work)} requests ...", flush=True)
            rows[name] = phase(client, args.model, work, clients, args.max_tokens)
    finally:
        server.stop()
    (seq_wall, _, seq_answers), (con_wall, _, con_answers) = rows.values()
    print("\n| phase | requests | answered | wall s | requests/s | latency p50 ms | latency p95 ms |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, (wall, latencies, answers) in rows.items():
        answered = sum(a is not None for a in answers)
        print(f"| {name} | {len(work)} | {answered} | {wall:.1f} | {len(work) / wall:.1f} | "
              f"{1000 * percentile(latencies, 50):.0f} | {1000 * percentile(latencies, 95):.0f} |")
    ratio = seq_wall / con_wall
    same = sum(a == b for a, b in zip(seq_answers, con_answers))
    print(f"\nthroughput ratio (concurrent / sequential): {ratio:.2f}x (target >= 4x: {'met' if ratio >= 4 else 'missed'})")
    print(f"concurrent answers equal to the sequential ones: {same}/{len(work)}; lost: {len(work) - len(con_answers)}")
    return 0 if same == len(work) else 1


if __name__ == "__main__":
    sys.exit(main())
