"""
serve.py under concurrent clients, on this machine's loopback, in two modes.

    python bench_serve.py --out_dir=out-quickstart
    python bench_serve.py --out_dir=out-quickstart --clients=1,16 --kind=loglikelihood --serve_args=--max_batch_size=16
    python bench_serve.py --out_dir=out-quickstart --soak=180   # 32 clients: 300 s of warm-up, then 180

Both start `python serve.py --out_dir=... --port=0 SERVE_ARGS` on 127.0.0.1 (whatever SERVE_ARGS
say) and stop it at the end.

Client counts (the default). For each count c, c client threads each send `rounds` requests one
after another over plain HTTP. A generation request is `prompt_tokens` random token ids (seeded, so
every run sends the same ones) and max_tokens new ones, greedy; its tokens are usage.completion_tokens
(fewer when <|endoftext|> comes first). A loglikelihood request is what lm-evaluation-harness sends:
prompt_tokens ids, echo, logprobs=1, max_tokens=1; its tokens are the prompt tokens scored. tokens/s is
all clients' tokens over the wall time from the first request to the last answer. The sweep runs
`repeats` times, interleaved, and each row gives the median over its repeats (the machine's load
changes under a long run). Against it, for generation, two baselines timed in this process on the
same checkpoint between the repeats, each in a KV cache of the server's rows and on its count of
CPU threads: the engine's own decode step, with c rows at different lengths (spread over one
request's life, as clients out of phase are) against one row; and the engine alone, serving the
clients' very requests without HTTP (each client's next request submitted the moment its last
ends, prefills included). Served / step is how much of what the step allows the server delivers,
served / engine how much of what the engine allows: the rest is HTTP, the server's threads and the
clients. Each ratio is the median of each repeat's own pair. A second table gives the same per
CPU-second (Linux): the server's CPU time against this thread's, which a busy machine's scheduler
does not blur. The clients' CPU share is this process's CPU time while they ran over that and
serve.py's; the server's CPU beside its engine thread is what HTTP, JSON and its other threads took
of serve.py's. A third table counts the engine thread's CPU time alone, and how busy it was (its CPU
over the wall time): served / step per wall second is about served / step per engine CPU-second (what
the batches themselves lose: rows standing empty while their clients' next requests come, prompts
prefilled apart) times the engine's busy share at c clients over its share at the first count (what
the hand-offs leave it waiting: for requests, the GIL or a core). On a machine of few cores the
clients compete with the server for them, so give the load average and compare runs as ratios.

Soak (--soak=SECONDS). soak_clients threads send requests one after another for soak_warmup + soak
seconds, or until soak_requests have gone, request k being the k-th of a fixed, shuffled cycle of 23
(MIX): greedy ones whose text must equal the same request's answer alone (each of 16 sent one at a
time before the soak), whole and streamed; sampled ones with n and stop strings;
lm-evaluation-harness loglikelihoods; ones that close their connection mid-stream or before their
answer; ones refused on purpose (n=0, a 400). Prompts of 1 to block_size + 16 tokens, max_tokens 1
to max_tokens. It reports requests, problems, latency (p50, p99), new tokens/s and the server's
memory (resident set) at start, after the warm-up and at the end, and fails in one line unless every
greedy answer equals its alone answer, no request hung (unanswered after hang_s), nothing failed
that was not provoked, the server printed no traceback, and its memory at the end is within 10% of
after the warm-up. The warm-up is there for the C heap: torch's tensors of ever new shapes (prompts
and batches of every size) leave glibc's malloc holding more memory for the first minutes, most of
it in the first, then hardly more; Python's own objects do not grow (see BENCHMARKS.md).
"""
import http.client
import itertools
import json
import os
import queue
import random
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from checkpoint import load_for_inference
from common import (DEVICE_HELP, DTYPE_HELP, UserError, autocast, resolve_device, resolve_dtype,
                    run_main)
from configurator import parse_config, split_settings
from engine import Engine, KVCache, Sequence

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder serve.py serves"),
    "clients": ("1,4,16,64", "numbers of concurrent clients, comma-separated"),
    "rounds": (4, "requests each client sends, one after another"),
    "repeats": (3, "times the whole sweep runs, interleaved, so a load change hits every count alike; "
                   "tokens/s is the median over repeats, latencies are pooled"),
    "kind": ("generate", "generate (greedy completions) or loglikelihood (echo + logprobs, max_tokens=1)"),
    "prompt_tokens": (16, "token ids per prompt"),
    "max_tokens": (64, "new tokens per generation request (soak: at most)"),
    "step_ratio": (True, "time the engine's own decode step too (generate only)"),
    "device": ("auto", "serve.py's and the engine step's: " + DEVICE_HELP),
    "dtype": ("auto", "serve.py's and the engine step's: " + DTYPE_HELP),
    "serve_args": ("", "more serve.py flags, e.g. '--max_batch_size=16' (device and dtype: set them above)"),
    "seed": (0, "draws the prompts"),
    "soak": (0, "seconds of the soak after its warm-up (see above); 0: the client counts instead"),
    "soak_warmup": (300, "seconds of the soak's requests before the server's memory is taken as its baseline"),
    "soak_clients": (32, "concurrent clients of the soak"),
    "soak_requests": (100_000, "the soak stops after this many requests, if its time has not run out first"),
    "hang_s": (60, "soak: a request not answered within this many seconds has hung"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
MEMORY_GROWTH = 0.10  # the soak's bound on the server's memory at the end over after warm-up
MIN_CPU_S = 0.5  # /proc counts CPU time in ticks of 10 ms: a run's shorter figures per CPU-second are not shown


# ---------------------------------------------------------------------------------------- the server

def start_server(config):
    """(process, port, banner, log): serve.py on 127.0.0.1 and the lines it writes on stderr."""
    command = [sys.executable, "serve.py", f"--out_dir={config['out_dir']}", "--port=0",
               f"--device={config['device']}", f"--dtype={config['dtype']}", *shlex.split(config["serve_args"]),
               "--host=127.0.0.1"]  # last, so that it holds: the clients are on this machine's loopback
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"at http://[^:]+:(\d+)/v1", line)
    if not match:
        process.wait()
        raise UserError(f"serve.py did not start: {line.strip()} {process.stderr.read().strip()}")
    log = []
    threading.Thread(target=log.extend, args=(process.stderr,), daemon=True).start()  # keeps its pipe from filling
    return process, int(match.group(1)), line.strip(), log


def cache_rows(banner):
    """The rows of the server's KV cache, from the line it starts with."""
    return int(re.search(r"batches of up to (\d+)", banner).group(1))


def cpu_threads(banner):
    """The server's torch threads on the CPU, from the line it starts with; None on a GPU."""
    match = re.search(r"cpu \((\d+) threads?\)", banner)
    return match and int(match.group(1))


def resident_mib(pid):
    """A process's resident memory in MiB (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


def cpu_seconds(pid, thread=None):
    """A process's (or one of its threads') user + system CPU time (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def engine_thread(pid):
    """The id of serve.py's engine thread (Linux), else None: once it has served, the busiest thread
    but the main one (which loaded the model)."""
    try:
        threads = [thread for thread in os.listdir(f"/proc/{pid}/task") if thread != str(pid)]
    except OSError:
        return None
    return max(threads, key=lambda thread: cpu_seconds(pid, thread) or 0, default=None)


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_info(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/tokenizer_info")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class Answer:
    """What one request got: HTTP status, the JSON answer, or a stream's text, finish and usage."""

    def __init__(self, status, body=None, text="", finish=None, usage=None, done=False):
        self.status, self.body, self.text, self.finish, self.usage, self.done = status, body, text, finish, usage, done


def send(port, body, timeout, stream=False, leave_after_first_piece=False):
    """Posts a completion request; an Answer. A stream is read to its [DONE], or left (the connection
    closed) once its first piece of text has come when leave_after_first_piece."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if not stream or response.status != 200:
            return Answer(response.status, body=json.loads(response.read()))
        answer = Answer(200)
        for line in response:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                answer.done = True
                break
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the stream carried an error: {chunk['error']['message']}")
            for choice in chunk["choices"]:
                answer.text += choice["text"]
                answer.finish = choice["finish_reason"] or answer.finish
            answer.usage = chunk.get("usage") or answer.usage
            if leave_after_first_piece and answer.text:
                break
        return answer
    finally:
        connection.close()


def post(port, body, timeout=600):
    """The JSON answer to a completion request, or a UserError with the server's message."""
    answer = send(port, body, timeout)
    if answer.status != 200:
        raise UserError(f"serve.py answered {answer.status}: {answer.body['error']['message']}")
    return answer.body


# ----------------------------------------------------------- client counts, and the engine's own step

def request_body(config, prompt):
    if config["kind"] == "loglikelihood":
        return {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    return {"prompt": prompt, "max_tokens": config["max_tokens"], "temperature": 0}


def tokens_of(config, answer):
    if config["kind"] == "loglikelihood":
        return answer["usage"]["prompt_tokens"] - 1
    return answer["usage"]["completion_tokens"]


def run_clients(config, port, clients, prompts, server_pid):
    """One count's clients: their tokens/s (per second, per server CPU-second, per CPU-second of its
    engine thread), each request's seconds, the CPU seconds that this process (the clients), the server
    and its engine thread used meanwhile, and the engine thread's share of the wall time."""
    def client(c):
        results = []
        for r in range(config["rounds"]):
            start = time.perf_counter()
            answer = post(port, request_body(config, prompts[(c * config["rounds"] + r) % len(prompts)]))
            results.append((time.perf_counter() - start, tokens_of(config, answer)))
        return results

    engine = engine_thread(server_pid)
    own, server, start = own_cpu_seconds(), cpu_seconds(server_pid), time.perf_counter()
    engine_cpu = cpu_seconds(server_pid, engine)
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    tokens, server_cpu = sum(t for _, t in results), None if server is None else cpu_seconds(server_pid) - server
    engine_cpu = None if engine_cpu is None else cpu_seconds(server_pid, engine) - engine_cpu
    if server_cpu is not None and server_cpu < MIN_CPU_S:
        server_cpu = engine_cpu = None
    elapsed = time.perf_counter() - start
    return {"rate": tokens / elapsed, "cpu_rate": server_cpu and tokens / server_cpu,
            "engine_rate": engine_cpu and tokens / engine_cpu, "engine_busy": engine_cpu and engine_cpu / elapsed,
            "latencies": [seconds for seconds, _ in results], "clients_cpu": own_cpu_seconds() - own,
            "server_cpu": server_cpu, "engine_cpu": engine_cpu}


@torch.no_grad()
def step_rate(model, rows, cache_rows, config, device, dtype, generator):
    """(new tokens per second, per CPU-second) of the engine's decode steps with rows sequences in
    flight, in this thread, in a cache of the server's cache_rows: their lengths spread over one
    request's life (prompt_tokens to prompt_tokens + max_tokens), as clients out of phase are; one row
    sits in the middle. The steps before the timed ones fill the cache. In serve.py's precision: a KV
    cache of dtype, the model under common.autocast."""
    steps = max(config["max_tokens"] // 2, 1)
    room = model.config.block_size - steps - 1  # no window may fill up while timed
    spread = [config["max_tokens"] * r // rows for r in range(rows)] if rows > 1 else [config["max_tokens"] // 2]
    lengths = [max(1, min(config["prompt_tokens"] + offset, room)) for offset in spread]
    # a prefill budget of every row padded to the longest, so that all rows are in the one prefill
    engine = Engine(model, KVCache(model.config, cache_rows, dtype, device), rows, rows * max(lengths))
    events = queue.SimpleQueue()  # the engine reports every token; nobody reads them here
    engine.submit([Sequence(torch.randint(model.config.vocab_size, (n,), generator=generator).tolist(), steps + 2,
                            events, r) for r, n in enumerate(lengths)])
    with autocast(device, dtype):
        engine.step(engine.admit())  # the prefill
        engine.step([])
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            engine.step([])  # each ends in .tolist() of the picked tokens: on a GPU too, the step is done
        return rows * steps / (time.perf_counter() - start), rows * steps / (time.thread_time() - cpu)


@torch.no_grad()
def engine_rate(model, clients, cache_rows, config, prompts, eos_id, device, dtype):
    """(new tokens per second, per CPU-second) of the engine serving what the clients ask, in this
    thread, without HTTP: each client's requests one after another, the next submitted the moment the
    last ends, in a cache of the server's cache_rows, prefills included. What the server could do if
    HTTP, its threads and the clients cost nothing."""
    engine = Engine(model, KVCache(model.config, cache_rows, dtype, device), clients, clients * len(prompts[0]))
    events, sent = queue.SimpleQueue(), [0] * clients

    def submit(c):  # the client's next request, as run_clients sends it
        prompt = prompts[(c * config["rounds"] + sent[c]) % len(prompts)]
        engine.submit([Sequence(prompt, config["max_tokens"], events, c, eos_id=eos_id)])
        sent[c] += 1

    tokens, start, cpu = 0, time.perf_counter(), time.thread_time()
    with autocast(device, dtype):
        for c in range(clients):
            submit(c)
        while engine.running or engine.waiting:
            engine.step(engine.admit())
            while not events.empty():
                c, event = events.get()
                tokens += event[0] == "token" and event[1] != eos_id  # usage.completion_tokens leaves it out
                if event[0] == "end" and sent[c] < config["rounds"]:
                    submit(c)
    return tokens / (time.perf_counter() - start), tokens / (time.thread_time() - cpu)


def sweep(config, counts, process, port, cache_rows, threads):
    """The client counts, repeats times, interleaved with the engine's step and the engine alone, both
    on the server's count of CPU threads: a row per count."""
    vocab = server_info(port)["vocab_size"]
    rng = random.Random(config["seed"])
    prompts = [[rng.randrange(vocab - 1) for _ in range(config["prompt_tokens"])] for _ in range(256)]
    model, generator = None, torch.Generator().manual_seed(config["seed"])
    if config["step_ratio"] and config["kind"] == "generate":
        device = resolve_device(config["device"])
        dtype = resolve_dtype(config["dtype"], device)
        _, model, encoding = load_for_inference(config["out_dir"], device)
        if threads:
            torch.set_num_threads(threads)
        step_rate(model, min(max(counts), cache_rows), cache_rows, config, device, dtype, generator)  # warm-up
    post(port, request_body(config, prompts[0]))  # warm-up: first allocations, kernels
    runs, steps, engines, loads = {c: [] for c in counts}, {c: [] for c in counts}, {c: [] for c in counts}, []
    for _ in range(config["repeats"]):
        for clients in counts:
            loads.append(os.getloadavg()[0])
            runs[clients].append(run_clients(config, port, clients, prompts, process.pid))
            if model is not None:  # (tokens/s, tokens per CPU-s): the median of 7 steps, one engine run
                timed = [step_rate(model, min(clients, cache_rows), cache_rows, config, device, dtype, generator)
                         for _ in range(7)]
                steps[clients].append(tuple(statistics.median(t[i] for t in timed) for i in (0, 1)))
                engines[clients].append(engine_rate(model, clients, cache_rows, config, prompts, encoding.eot_token,
                                                    device, dtype))
    first, rows = counts[0], []
    for clients in counts:
        latencies = sorted(seconds for run in runs[clients] for seconds in run["latencies"])
        used = [(run["clients_cpu"], run["server_cpu"], run["engine_cpu"]) for run in runs[clients]]
        known = None not in (value for run in used for value in run)
        row = {"clients": clients, "requests": len(latencies),
               "latency_median_s": statistics.median(latencies), "latency_p95_s": quantile(latencies, 0.95),
               "clients_cpu_share": sum(own for own, _, _ in used) / sum(own + server for own, server, _ in used)
               if known else None,
               "http_cpu_share": (sum(server - engine for _, server, engine in used)
                                  / sum(server for _, server, _ in used)) if known else None,
               "engine_busy": statistics.median(run["engine_busy"] for run in runs[clients]) if known else None}
        for clock, i, served in (("wall", 0, "rate"), ("cpu", 1, "cpu_rate"), ("engine", 1, "engine_rate")):
            if any(run[served] is None for c in counts for run in runs[c]):  # no CPU times (not Linux), or too few
                continue
            rates = [run[served] for run in runs[clients]]
            row[f"{clock}_tokens_per_s"] = statistics.median(rates)
            row[f"{clock}_vs_first"] = statistics.median(
                rate / run[served] for rate, run in zip(rates, runs[first]))  # each repeat's own pair
            for name, baseline in (("step", steps), ("engine", engines)):
                if model is None:
                    continue
                vs_first = [b[i] / b_first[i] for b, b_first in zip(baseline[clients], baseline[first])]
                row[f"{clock}_{name}_vs_first"] = statistics.median(vs_first)
                row[f"{clock}_served_vs_{name}"] = [rate / run[served] / v for rate, run, v
                                                    in zip(rates, runs[first], vs_first)]
        rows.append(row)
    return rows, (min(loads), max(loads))


def print_sweep(config, argv, banner, rows, loads):
    print(f"{banner}\npython bench_serve.py {' '.join(argv)}")
    unit = "scored tokens" if config["kind"] == "loglikelihood" else "new tokens"
    first = rows[0]["clients"]
    extra = {"wall": " latency median | latency p95 | clients' CPU share | server's CPU beside its engine thread |",
             "engine": " engine thread busy (its CPU / wall) |"}
    for clock, per in (("wall", "s"), ("cpu", "server CPU-s"), ("engine", "engine-thread CPU-s")):  # per
        if f"{clock}_tokens_per_s" not in rows[0]:  # CPU-second: what a busy machine's scheduler leaves out
            continue
        wall = clock == "wall"
        print(f"\n| clients | requests | {unit} per {per} | vs {first} | step vs {first} | engine vs {first} | "
              f"served / step | served / engine |" + extra.get(clock, "")
              + "\n|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * extra.get(clock, "").count("|"))
        for row in rows:
            ratios = [shown(row.get(f"{clock}_{name}_vs_first"), "{:.1f}x") for name in ("step", "engine")]
            shares = [shown(statistics.median(row[f"{clock}_served_vs_{name}"]) if f"{clock}_served_vs_{name}" in row
                            else None, "{:.0%}") for name in ("step", "engine")]
            print(f"| {row['clients']} | {row['requests']} | {row[f'{clock}_tokens_per_s']:,.0f} | "
                  f"{row[f'{clock}_vs_first']:.1f}x | {' | '.join(ratios)} | {' | '.join(shares)} |"
                  + f" {row['latency_median_s']:.2f} s | {row['latency_p95_s']:.2f} s | "
                    f"{shown(row['clients_cpu_share'], '{:.0%}')} | "
                    f"{shown(row['http_cpu_share'], '{:.1%}')} |" * wall
                  + f" {shown(row['engine_busy'], '{:.0%}')} |" * (clock == "engine"))
        for row in rows[1:]:
            for name in ("step", "engine"):
                if row.get(f"{clock}_served_vs_{name}"):
                    each = ", ".join(f"{r:.0%}" for r in row[f"{clock}_served_vs_{name}"])
                    print(f"served / {name} per {per} at {row['clients']} clients, each repeat: {each}")
    print(f"load average (1 min) {loads[0]:.1f} to {loads[1]:.1f} during the runs, {os.cpu_count()} CPUs")


def shown(value, form):
    return "-" if value is None else form.format(value)


# ---------------------------------------------------------------------------------------------- soak

MIX = {"greedy": 8, "greedy_stream": 4, "sampled": 4, "loglikelihood": 2, "disconnect": 2, "cancel": 2, "refused": 1}
CYCLE = [kind for kind, count in MIX.items() for _ in range(count)]  # request k of a soak is a CYCLE[k % len(CYCLE)]
random.Random(0).shuffle(CYCLE)
PROVOKED = ("disconnect", "cancel", "refused")  # what these find is expected, not an error


def cancel(port, body, rng):
    """Sends a request and closes the connection before the answer, within 20 ms."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(rng.uniform(0, 0.02))


class Wrong(Exception):
    """An answer that is not what its request should get."""


class Differs(Wrong):
    """A greedy answer that is not the same request's answer alone."""


def check(ok, message, kind=Wrong):
    if not ok:
        raise kind(message)


def one_request(kind, rng, port, soak_set, config):
    """Sends one request of this kind and checks its answer (Wrong if it is not right); its new tokens."""
    pool, alone, vocab, block_size = soak_set
    timeout, pick = config["hang_s"], rng.randrange(len(pool))
    greedy = {"prompt": pool[pick][0], "max_tokens": pool[pick][1], "temperature": 0}

    def random_ids(longest):
        return [rng.randrange(vocab - 1) for _ in range(rng.randint(2, longest))]

    if kind == "greedy":
        answer = send(port, greedy, timeout)
        check(answer.status == 200, f"greedy request: status {answer.status}")
        check(answer.body["choices"][0]["text"] == alone[pick], f"greedy request {pick}: not its answer alone", Differs)
        return answer.body["usage"]["completion_tokens"]
    if kind == "greedy_stream":
        answer = send(port, {**greedy, "stream": True, "stream_options": {"include_usage": True}}, timeout, stream=True)
        check(answer.status == 200 and answer.done and answer.finish, "streamed greedy request: status "
              f"{answer.status}, finish_reason {answer.finish}, [DONE] {'seen' if answer.done else 'missing'}")
        check(answer.text == alone[pick], f"streamed greedy request {pick}: not its answer alone", Differs)
        return answer.usage["completion_tokens"]
    if kind == "sampled":
        n = rng.choice((1, 2))
        answer = send(port, {"prompt": random_ids(block_size), "max_tokens": rng.randint(1, config["max_tokens"]),
                             "temperature": 0.8, "top_p": 0.9, "n": n, "seed": rng.randrange(2 ** 32),
                             "stop": ["\n\n", "the"]}, timeout)
        check(answer.status == 200 and len(answer.body["choices"]) == n, f"sampled request: status {answer.status}")
        return answer.body["usage"]["completion_tokens"]
    if kind == "loglikelihood":
        ids = random_ids(block_size)
        answer = send(port, {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}, timeout)
        check(answer.status == 200 and len(answer.body["choices"][0]["logprobs"]["token_logprobs"]) == len(ids) + 1,
              f"loglikelihood request: status {answer.status}, or not {len(ids) + 1} logprobs")
        return answer.body["usage"]["completion_tokens"]
    if kind == "disconnect":
        answer = send(port, {**greedy, "stream": True}, timeout, stream=True, leave_after_first_piece=True)
        check(answer.status == 200, f"streamed request left mid-stream: status {answer.status}")
    elif kind == "cancel":
        cancel(port, greedy, rng)
    elif kind == "refused":
        answer = send(port, {**greedy, "n": 0}, timeout)
        check(answer.status == 400 and answer.body["error"]["param"] == "n", f"n=0: status {answer.status}, not 400")
    return 0


def soak_client(c, port, soak_set, config, numbers, deadline, results):
    """Requests of the mix, one after another, until the deadline or the soak's last request number:
    (kind, seconds, new tokens, problem, finished at) each, problem None or (differs | hung | failed, what
    happened)."""
    rng = random.Random(config["seed"] * 1000 + c)
    while (number := next(numbers)) < config["soak_requests"] and time.monotonic() < deadline:
        kind, start, tokens, problem = CYCLE[number % len(CYCLE)], time.monotonic(), 0, None
        try:
            tokens = one_request(kind, rng, port, soak_set, config)
        except Differs as e:
            problem = ("differs", str(e))
        except TimeoutError:
            problem = ("hung", f"{kind} request: no answer in {config['hang_s']} s")
        except Exception as e:  # a wrong answer, a connection refused or reset, JSON that does not parse, ...
            problem = ("failed", f"{kind} request: {type(e).__name__}: {e}")
        results.append((kind, time.monotonic() - start, tokens, problem, time.monotonic()))  # atomic under the GIL


def soak(config, process, port, log):
    """Runs the soak; a summary of what it found."""
    info = server_info(port)
    vocab, block_size = info["vocab_size"], info["model_max_length"]
    rng = random.Random(config["seed"])
    pool = [([rng.randrange(vocab - 1) for _ in range(rng.randint(1, block_size + 16))],
             rng.randint(1, config["max_tokens"])) for _ in range(16)]
    memory = {"start": resident_mib(process.pid), "after warm-up": None}
    alone = [post(port, {"prompt": ids, "max_tokens": n, "temperature": 0}, config["hang_s"])["choices"][0]["text"]
             for ids, n in pool]  # one at a time, before any other request
    results, numbers, start = [], itertools.count(), time.monotonic()
    warm, deadline = start + config["soak_warmup"], start + config["soak_warmup"] + config["soak"]
    clients = [threading.Thread(target=soak_client, daemon=True, args=(
        c, port, (pool, alone, vocab, block_size), config, numbers, deadline, results))
        for c in range(config["soak_clients"])]
    for client in clients:
        client.start()
    peak = 0
    while any(c.is_alive() for c in clients) and time.monotonic() < deadline + config["hang_s"] + 5:
        time.sleep(0.2)
        peak = max(peak, resident_mib(process.pid) or 0)
        if memory["after warm-up"] is None and time.monotonic() >= warm:
            memory["after warm-up"] = resident_mib(process.pid)
    memory["after warm-up"] = memory["after warm-up"] or resident_mib(process.pid)  # the requests ran out first
    memory["end"], memory["peak"] = resident_mib(process.pid), peak or None
    problems = [problem for *_, problem, _ in results if problem is not None]
    problems += [("hung", "a client still waiting at the end")] * sum(c.is_alive() for c in clients)
    if process.poll() is not None:
        problems.append(("failed", f"serve.py exited with code {process.returncode}"))
    if any("Traceback" in line for line in log):
        problems.append(("failed", "serve.py printed a traceback: " + "".join(log)[-300:].strip()))
    answered = sorted(seconds for kind, seconds, _, problem, _ in results if kind not in PROVOKED and problem is None)
    elapsed = max((finished for *_, finished in results), default=start) - start
    return {
        "clients": config["soak_clients"], "seconds": elapsed, "requests": len(results), "problems": problems,
        "by_kind": {kind: [r for r in results if r[0] == kind] for kind in MIX},
        "greedy_compared": sum(1 for kind, *_ in results if kind in ("greedy", "greedy_stream")),
        "latency_p50_s": quantile(answered, 0.5), "latency_p99_s": quantile(answered, 0.99),
        "tokens_per_s": sum(r[2] for r in results) / max(elapsed, 1e-9), "memory_mib": memory,
    }


def quantile(values, q):
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None


def soak_failures(result):
    """Why the soak did not hold ([] if it held)."""
    counts = {category: sum(1 for c, _ in result["problems"] if c == category)
              for category in ("differs", "hung", "failed")}
    failures = [f"{counts['differs']} greedy answers differ from their alone answers"] if counts["differs"] else []
    failures += [f"{counts['hung']} requests hung"] if counts["hung"] else []
    failures += [f"{counts['failed']} errors that were not provoked"] if counts["failed"] else []
    memory = result["memory_mib"]
    if None not in memory.values() and memory["end"] > (1 + MEMORY_GROWTH) * memory["after warm-up"]:
        failures.append(f"the server's memory grew from {memory['after warm-up']:.0f} MiB after warm-up to "
                        f"{memory['end']:.0f} MiB, more than {MEMORY_GROWTH:.0%}")
    return failures


def print_soak(argv, banner, result):
    print(f"{banner}\npython bench_serve.py {' '.join(argv)}")
    print(f"soak: {result['clients']} clients for {result['seconds']:.0f} s, load average (1 min) "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs")
    print("| kind | requests | problems | latency p50 |\n|---|---:|---:|---:|")
    for kind, runs in result["by_kind"].items():
        p50 = quantile(sorted(r[1] for r in runs), 0.5)
        print(f"| {kind}{' (provoked)' if kind in PROVOKED else ''} | {len(runs)} | "
              f"{sum(1 for r in runs if r[3] is not None)} | {shown(p50, '{:.2f} s')} |")
    memory = result["memory_mib"]
    growth = None if None in memory.values() else memory["end"] / memory["after warm-up"] - 1
    print(f"requests {result['requests']}, problems {len(result['problems'])}; greedy answers compared with their "
          f"alone answers {result['greedy_compared']}")
    print(f"latency of the answered requests p50 {shown(result['latency_p50_s'], '{:.2f} s')}, "
          f"p99 {shown(result['latency_p99_s'], '{:.2f} s')}; {result['tokens_per_s']:,.0f} new tokens/s")
    print("server memory (resident): " + ", ".join(f"{k} {shown(v, '{:.0f} MiB')}" for k, v in memory.items())
          + f"; end over after warm-up {shown(growth, '{:+.1%}')}")
    for category, message in result["problems"][:5]:
        print(f"  {category}: {message}")


# ---------------------------------------------------------------------------------------------- main

def main(argv):
    config = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    try:
        counts = [int(c) for c in config["clients"].split(",")]
    except ValueError:
        raise UserError(f"clients must be comma-separated counts, e.g. 1,4,16, got '{config['clients']}'") from None
    if min(counts + [config["rounds"], config["repeats"], config["max_tokens"]]) < 1 or config["prompt_tokens"] < 2:
        raise UserError("clients, rounds, repeats and max_tokens must be positive, prompt_tokens at least 2")
    if config["kind"] not in ("generate", "loglikelihood"):
        raise UserError(f"kind must be generate or loglikelihood, got '{config['kind']}'")
    if min(config["soak"], config["soak_warmup"]) < 0 or min(config["soak_clients"], config["soak_requests"],
                                                              config["hang_s"]) <= 0:
        raise UserError("soak and soak_warmup must be 0 or more seconds; soak_clients, soak_requests and hang_s "
                        "positive")
    process, port, banner, log = start_server(config)
    try:
        if config["soak"]:
            result = soak(config, process, port, log)
        else:
            rows, loads = sweep(config, counts, process, port, cache_rows(banner), cpu_threads(banner))
    finally:
        process.terminate()
        process.wait()
    if config["soak"]:
        print_soak(argv, banner, result)
        failures = soak_failures(result)
        if failures:
            raise UserError(f"the soak did not hold: {'; '.join(failures)}")
    else:
        print_sweep(config, argv, banner, rows, loads)


if __name__ == "__main__":
    run_main(main)
