"""
serve.py under concurrent clients: aggregate tokens/s and per-request latency (median, 95th
percentile) at each number of clients, for generation and for lm-evaluation-harness-style
loglikelihood requests.

    python bench_serve.py --out_dir=out-quickstart
    python bench_serve.py --out_dir=out-quickstart --clients=1,16 --kind=loglikelihood --serve_args="--max_batch_size=16"

It starts `python serve.py --out_dir=... --port=0 SERVE_ARGS` on 127.0.0.1, then for each count c runs
c client threads, each sending `rounds` requests one after another over plain HTTP. A generation
request is `prompt_tokens` random token ids (seeded, so every run sends the same ones) and
max_tokens new ones, greedy; its tokens are usage.completion_tokens (fewer when <|endoftext|> comes
first). A loglikelihood request is what the harness sends: prompt_tokens ids, echo, logprobs=1,
max_tokens=1; its tokens are the prompt tokens scored. tokens/s is all clients' tokens over the wall
time from the first request to the last answer. The sweep runs `repeats` times, interleaved, and each
row gives the median tokens/s of its repeats (the machine's load changes under a long run).
"""
import http.client
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common import UserError, run_main
from configurator import parse_config, split_settings

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder serve.py serves"),
    "clients": ("1,4,16,64", "numbers of concurrent clients, comma-separated"),
    "rounds": (4, "requests each client sends, one after another"),
    "repeats": (3, "times the whole sweep runs, interleaved, so a load change hits every count alike; "
                   "tokens/s is the median over repeats, latencies are pooled"),
    "kind": ("generate", "generate (greedy completions) or loglikelihood (echo + logprobs, max_tokens=1)"),
    "prompt_tokens": (16, "token ids per prompt"),
    "max_tokens": (64, "new tokens per generation request"),
    "serve_args": ("", "more serve.py flags, e.g. '--max_batch_size=16 --dtype=float32'"),
    "seed": (0, "draws the prompts"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)


def start_server(config):
    command = [sys.executable, "serve.py", f"--out_dir={config['out_dir']}", "--port=0",
               *shlex.split(config["serve_args"])]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"at http://[^:]+:(\d+)/v1", line)
    if not match:
        process.wait()
        raise UserError(f"serve.py did not start: {line.strip()} {process.stderr.read().strip()}")
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe from filling
    return process, int(match.group(1)), line.strip()


def post(port, body):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise UserError(f"serve.py answered {response.status}: {answer['error']['message']}")
        return answer
    finally:
        connection.close()


def request_body(config, prompt):
    if config["kind"] == "loglikelihood":
        return {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    return {"prompt": prompt, "max_tokens": config["max_tokens"], "temperature": 0}


def tokens_of(config, answer):
    if config["kind"] == "loglikelihood":
        return answer["usage"]["prompt_tokens"] - 1
    return answer["usage"]["completion_tokens"]


def run_clients(config, port, clients, prompts):
    def client(c):
        results = []
        for r in range(config["rounds"]):
            start = time.perf_counter()
            answer = post(port, request_body(config, prompts[(c * config["rounds"] + r) % len(prompts)]))
            results.append((time.perf_counter() - start, tokens_of(config, answer)))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return sum(t for _, t in results) / (time.perf_counter() - start), [seconds for seconds, _ in results]


def summary(clients, runs):
    """One table row from the repeats of one count: [(tokens/s, latencies)]."""
    latencies = sorted(seconds for _, run in runs for seconds in run)
    return {"clients": clients, "requests": len(latencies), "tokens_per_s": statistics.median(r for r, _ in runs),
            "latency_median_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def main(argv):
    config = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    try:
        counts = [int(c) for c in config["clients"].split(",")]
    except ValueError:
        raise UserError(f"clients must be comma-separated counts, e.g. 1,4,16, got '{config['clients']}'") from None
    if min(counts) < 1 or min(config["rounds"], config["repeats"], config["max_tokens"]) < 1 or config["prompt_tokens"] < 2:
        raise UserError("clients, rounds, repeats and max_tokens must be positive, prompt_tokens at least 2")
    if config["kind"] not in ("generate", "loglikelihood"):
        raise UserError(f"kind must be generate or loglikelihood, got '{config['kind']}'")
    process, port, banner = start_server(config)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/tokenizer_info")
        vocab = json.loads(connection.getresponse().read())["vocab_size"]
        rng = random.Random(config["seed"])
        prompts = [[rng.randrange(vocab - 1) for _ in range(config["prompt_tokens"])] for _ in range(256)]
        post(port, request_body(config, prompts[0]))  # warm-up: first allocations, kernels
        runs = {clients: [] for clients in counts}
        for _ in range(config["repeats"]):
            for clients in counts:
                runs[clients].append(run_clients(config, port, clients, prompts))
        rows = [summary(clients, runs[clients]) for clients in counts]
    finally:
        process.terminate()
        process.wait()
    print(f"{banner}\npython bench_serve.py {' '.join(argv)}")
    unit = "scored tokens/s" if config["kind"] == "loglikelihood" else "new tokens/s"
    print(f"| clients | requests | {unit} | vs 1 client | latency median | latency p95 |\n|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x | {row['latency_median_s']:.2f} s | "
              f"{row['latency_p95_s']:.2f} s |")


if __name__ == "__main__":
    run_main(main)
