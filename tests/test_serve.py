"""serve.py through the real `openai` client: greedy text as sample.py's, streaming, echo + logprobs as
the model computes them, seeded sampling, stop strings, bad requests answered 4xx, concurrent requests."""
import glob
import http.client
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bench_serve
import serve
from checkpoint import build_model, load_checkpoint
from conftest import recomputed, shakespeare_text
from serve import Inbox
from test_engine import model_logprobs
from tokenizer import get_encoding

pytestmark = pytest.mark.xdist_group("serve")  # one worker: its module fixtures are made once

openai = pytest.importorskip("openai")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS_CAP = 48
MAX_BODY_BYTES = 100_000


class Server:
    def __init__(self, out_dir, *flags):
        self.out_dir = out_dir
        self.process = subprocess.Popen(
            [sys.executable, "serve.py", f"--out_dir={out_dir}", "--port=0", f"--max_tokens_cap={MAX_TOKENS_CAP}",
             f"--max_body_bytes={MAX_BODY_BYTES}", *flags], cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.log, lines = [], queue.Queue()
        threading.Thread(target=self.read_log, args=(lines,), daemon=True).start()  # also keeps the pipe from filling
        first = lines.get(timeout=120)
        match = re.search(r"serving (\S+) .* at http://127\.0\.0\.1:(\d+)/v1", first or "")
        assert match, f"serve.py did not start: {''.join(self.log)}"
        self.name, self.port = match.group(1), int(match.group(2))
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def read_log(self, lines):
        for line in self.process.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def complete(self, **request):
        return self.client.completions.create(model=self.name, **request)

    def raw(self, method, path, body=b""):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    server = Server(trained_checkpoint("fixed_min"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(server):
    checkpoint = load_checkpoint(server.out_dir)
    return build_model(checkpoint), get_encoding(checkpoint["meta"]["encoding"])


@pytest.fixture(scope="module")
def prompt():
    return shakespeare_text()[3000:3030]


def test_models_lists_the_checkpoint(server):
    assert [m.id for m in server.client.models.list()] == [server.name]


def test_greedy_text_equals_sample_py(prompt, server):
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={server.out_dir}", f"--start={prompt}",
                             "--temperature=0", "--max_new_tokens=40"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    answer = server.complete(prompt=prompt, max_tokens=40, temperature=0)
    [choice] = answer.choices
    assert result.stdout == prompt + choice.text + "\n"
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 40
    assert answer.usage.prompt_tokens == len(prompt.encode("utf-8"))  # byte tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 40


def test_streaming_yields_the_same_text_in_pieces(prompt, server):
    whole = server.complete(prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    chunks = list(server.complete(prompt=prompt, max_tokens=40, temperature=0, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices[0].finish_reason is None]
    assert "".join(pieces) == whole and len(pieces) > 1
    assert chunks[-1].choices[0].finish_reason == "length"


def test_echo_logprobs_are_the_models(prompt, server, model):
    model, encoding = model
    answer = server.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    [choice] = answer.choices
    ids = encoding.encode(prompt)
    expected, scores = model_logprobs(model, ids)
    assert choice.text == prompt and answer.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.tokens == list(prompt)  # ASCII: one byte token per character
    assert logprobs.text_offset == list(range(len(prompt)))
    accented = server.complete(prompt="é!", max_tokens=0, echo=True, logprobs=1, temperature=0).choices[0].logprobs
    assert accented.text_offset == [0, 0, 1]  # two byte tokens make the é at 0; ! is character 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    for position, top in enumerate(logprobs.top_logprobs[1:]):  # two tokens may share a text (bytes >= 0x80)
        best = scores[position].topk(2).values.tolist()
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(best[0], abs=1e-5)
        assert all(min(abs(value - b) for b in best) < 1e-5 for value in top.values())


def test_loglikelihood_request_as_lm_eval_sends_it(server, model):
    """lm-evaluation-harness local-completions: token-id prompts, echo, max_tokens=1, logprobs=1, and it
    sums token_logprobs[context_length:-1]."""
    model, encoding = model
    contexts = [encoding.encode(shakespeare_text()[i:i + 30]) for i in (100, 7000)]
    continuation = encoding.encode(" the king")
    answer = server.complete(prompt=[c + continuation for c in contexts], max_tokens=1, echo=True, logprobs=1,
                             temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice, context in zip(answer.choices, contexts):
        ids = context + continuation
        expected, scores = model_logprobs(model, ids)
        greedy_next = scores[-1].argmax().item()
        token_logprobs = choice.logprobs.token_logprobs
        assert len(token_logprobs) == len(ids) + 1
        assert token_logprobs[len(context):-1] == pytest.approx(expected[len(context) - 1:], abs=1e-5)
        assert token_logprobs[-1] == pytest.approx(scores[-1, greedy_next].item(), abs=1e-5)
        assert choice.text == encoding.decode(ids + [greedy_next], errors="replace")
        tops = choice.logprobs.top_logprobs[len(context):-1]
        is_greedy = all(lp == pytest.approx(max(top.values()), abs=1e-6)
                        for lp, top in zip(token_logprobs[len(context):-1], tops))
        assert is_greedy == all(scores[i - 1].argmax().item() == ids[i] for i in range(len(context), len(ids)))


def test_seed_makes_sampling_reproducible(prompt, server):
    request = dict(prompt=prompt, max_tokens=30, temperature=1.0, n=2)
    first, again, other = ([c.text for c in server.complete(seed=seed, **request).choices] for seed in (3, 3, 4))
    assert first == again and first != other
    assert len(first) == 2 and first[0] != first[1]


def test_seeds_are_those_torch_takes_for_every_choice(server):
    """Choice i samples with seed + i, so the last choice's seed must be one torch.Generator takes too."""
    answer = server.complete(prompt="a", max_tokens=1, temperature=1.0, seed=2 ** 64 - 2, n=2)
    assert len(answer.choices) == 2
    with pytest.raises(openai.BadRequestError) as error:
        server.complete(prompt="a", max_tokens=1, seed=2 ** 64 - 2, n=3)
    assert f"between {-2 ** 63} and {2 ** 64 - 3}" in error.value.body["message"]


def test_stop_strings_cut_the_text(prompt, server):
    request = dict(prompt=prompt, max_tokens=40, temperature=1.0, seed=1)  # seeded: the same tokens every time
    whole = server.complete(**request).choices[0].text
    stop = whole[20:23]
    expected = whole[:whole.find(stop)]
    for stream in (False, True):
        answer = server.complete(**request, stop=[stop, "never there"], stream=stream)
        if stream:
            answer = list(answer)
            text, finish = "".join(c.choices[0].text for c in answer), answer[-1].choices[0].finish_reason
        else:
            text, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert (text, finish) == (expected, "stop")


def test_long_prompt_is_cropped_from_the_left(server, model):
    model, encoding = model
    long_prompt = shakespeare_text()[5000:5100]  # 100 byte tokens, context 64
    answer = server.complete(prompt=long_prompt, max_tokens=10, temperature=0)
    ids = torch.tensor([encoding.encode(long_prompt)])
    expected = recomputed(model, ids, 10, temperature=0)[0, -10:].tolist()  # it crops to its last 64 too
    assert answer.choices[0].text == encoding.decode(expected, errors="replace")
    assert answer.usage.prompt_tokens == 100


BAD_FIELDS = {  # request fields -> the param the error names
    "max_tokens not an integer": (dict(max_tokens="ten"), "max_tokens"),
    "max_tokens beyond the context": (dict(max_tokens=10_000), "max_tokens"),
    "max_tokens beyond the cap": (dict(max_tokens=MAX_TOKENS_CAP + 1), "max_tokens"),
    "negative temperature": (dict(temperature=-0.5), "temperature"),
    "n zero": (dict(n=0), "n"),
    "n too large": (dict(n=1000), "n"),
    "empty token list": (dict(prompt=[[]]), "prompt"),
    "empty prompt list": (dict(prompt=[]), "prompt"),
    "token id outside the vocabulary": (dict(prompt=[[1, 2, 999]]), "prompt"),
    "stop not a string": (dict(stop=5), "stop"),
    "echo not a boolean": (dict(echo="yes"), "echo"),
    "top_p zero": (dict(top_p=0), "top_p"),
    "top_k not an integer": (dict(extra_body={"top_k": "five"}), "top_k"),
    "logprobs beyond the context": (dict(prompt="x" * 100, echo=True, logprobs=1, max_tokens=0), "prompt"),
    "logprobs while streaming": (dict(logprobs=1, stream=True), "logprobs"),
    "seed beyond torch's": (dict(seed=2 ** 64), "seed"),
    "seed below torch's": (dict(seed=-2 ** 63 - 1), "seed"),
    "seed + choice beyond torch's": (dict(seed=2 ** 64 - 1, n=2), "seed"),
}
BAD_BODIES = {  # (method, path, body) -> status
    "invalid JSON": (("POST", "/v1/completions", b'{"prompt": "x",'), 400),
    "not an object": (("POST", "/v1/completions", b'["x"]'), 400),
    "nested too deep": (("POST", "/v1/completions", b"[" * 40_000 + b"]" * 40_000), 400),
    "oversized body": (("POST", "/v1/completions", json.dumps({"prompt": "x" * 2 * MAX_BODY_BYTES}).encode()), 413),
    "unknown POST route": (("POST", "/v1/chat/completions", b'{"prompt": "x"}'), 404),
    "unknown GET route": (("GET", "/v1/nothing", b""), 404),
}


@pytest.fixture(scope="module")
def normal_answer(prompt, server):
    return lambda: server.complete(prompt=prompt, max_tokens=5, temperature=0).choices[0].text


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_fields_get_400_and_the_server_keeps_serving(prompt, server, normal_answer, case):
    before = normal_answer()
    fields, param = BAD_FIELDS[case]
    with pytest.raises(openai.BadRequestError) as error:
        server.complete(**{"prompt": prompt, "max_tokens": 5, **fields})
    assert error.value.status_code == 400
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["param"] == param
    assert error.value.body["message"]
    assert normal_answer() == before


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_4xx_and_the_server_keeps_serving(server, normal_answer, case):
    before = normal_answer()
    (method, path, body), status = BAD_BODIES[case]
    got, answer = server.raw(method, path, body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert normal_answer() == before


def test_unknown_fields_are_ignored(prompt, server, normal_answer):
    answer = server.complete(prompt=prompt, max_tokens=5, temperature=0, extra_body={"frobnicate": [1, 2]})
    assert answer.choices[0].text == normal_answer()


def test_a_whole_answer_wakes_its_reader_at_the_end_and_a_stream_at_every_token():
    """A thread woken per token takes the GIL from the engine thread at every step: a whole answer's
    reader is woken once its sequence ends, and takes all its events then, in order."""
    events = [(0, ("token", t, None, None)) for t in (65, 66, 67)] + [(0, ("end", "length"))]
    for wake_per_token, rings in ((False, 1), (True, 4)):
        inbox = Inbox(wake_per_token)
        for event in events[:3]:
            inbox.put(event)
        assert inbox.bell.qsize() == rings - 1
        inbox.put(events[3])
        assert inbox.bell.qsize() == rings
        assert inbox.take(timeout=0) == events and inbox.bell.qsize() == 0
        assert inbox.take(timeout=0) == []


def test_concurrent_requests_each_get_their_own_answer(prompt, server):
    text = shakespeare_text()
    requests = [dict(prompt=text[i:i + 30], max_tokens=30, temperature=1.0, seed=i) for i in (0, 900, 1800)]
    requests.append(dict(prompt=prompt, max_tokens=30, temperature=0.9, seed=11, n=2))
    requests.append(dict(prompt=prompt, max_tokens=30, temperature=0))
    serial = [[c.text for c in server.complete(**r).choices] for r in requests]
    assert len({text for answer in serial for text in answer}) == 6  # all differ, so a mix-up would show
    with ThreadPoolExecutor(max_workers=2 * len(requests)) as pool:
        concurrent = list(pool.map(lambda r: [c.text for c in server.complete(**r).choices], requests * 2))
    assert concurrent == serial * 2


# ------------------------------------------------------------------ tokenizer routes, methods, settings

def test_tokenizer_routes_are_vllms(server):
    status, info = server.raw("GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    status, answer = server.raw("POST", "/tokenize", json.dumps({"prompt": "ROMEO:<|endoftext|>",
                                                                 "add_special_tokens": False}).encode())
    assert status == 200 and answer["tokens"] == list(b"ROMEO:") + [256]
    status, answer = server.raw("POST", "/detokenize", json.dumps({"tokens": answer["tokens"]}).encode())
    assert status == 200 and answer["prompt"] == "ROMEO:<|endoftext|>"
    status, answer = server.raw("POST", "/detokenize", json.dumps({"tokens": [999]}).encode())
    assert status == 400 and answer["error"]["param"] == "tokens"


@pytest.mark.parametrize("method, path, status", [
    ("PUT", "/v1/completions", 405), ("DELETE", "/v1/models", 405), ("PATCH", "/", 405), ("OPTIONS", "/", 405),
    ("FROB", "/v1/completions", 405), ("GET", "/", 404), ("GET", "/v1/completions", 405),
    ("POST", "/v1/models", 405), ("HEAD", "/v1/models", 405)])
def test_every_method_and_path_gets_a_json_error(server, normal_answer, method, path, status):
    before = normal_answer()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, body=b"{}" if method != "HEAD" else None)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == status and response.getheader("Content-Type") == "application/json"
    if method != "HEAD":
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert normal_answer() == before


def serve_fails(*flags):
    result = subprocess.run([sys.executable, "serve.py", *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_bad_settings_are_one_line_errors(server):
    assert "0..65535" in serve_fails("--port=65536")
    assert "did you mean 'port'" in serve_fails("--prot=8000")
    assert "max_queue must be positive" in serve_fails("--max_queue=0")
    assert "max_body_bytes must be positive" in serve_fails("--max_body_bytes=-1")
    assert "cannot resolve host 'no-such-host.invalid'" in serve_fails("--host=no-such-host.invalid", "--port=0")
    assert f"port {server.port} is already in use" in serve_fails(f"--port={server.port}")


def test_help_shows_values_and_meanings():
    result = subprocess.run([sys.executable, "serve.py", "--port=9000", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert re.search(r"--port=9000\s+port to listen on", result.stdout)
    assert re.search(r"--max_batch_size=64\s+sequences decoded together", result.stdout)


def keep_busy(server):
    """Requests of 16 sequences, one after another, until the server goes away."""
    body = json.dumps({"prompt": ["ROMEO:"] * 4, "n": 4, "max_tokens": MAX_TOKENS_CAP}).encode()
    try:
        while True:
            server.raw("POST", "/v1/completions", body)
    except (OSError, http.client.HTTPException, ValueError):
        return


@pytest.mark.parametrize("signal_name, code, busy", [("SIGTERM", 0, False), ("SIGTERM", 0, True),
                                                     ("SIGINT", 130, True)])
def test_signals_stop_the_server_in_one_line(trained_checkpoint, signal_name, code, busy):
    """Idle, or with requests in flight: then the engine thread must end before the interpreter does, or
    the process aborts (SIGABRT, 'terminate called without an active exception')."""
    server = Server(trained_checkpoint("fixed_min"))
    clients = [threading.Thread(target=keep_busy, args=(server,), daemon=True) for _ in range(4 if busy else 0)]
    try:
        server.complete(prompt="x", max_tokens=2)
        for client in clients:
            client.start()
        if busy:  # a stream's first token: the engine is at work, on it and on the clients' sequences
            next(iter(server.complete(prompt="x", max_tokens=MAX_TOKENS_CAP, stream=True)))
        server.process.send_signal(getattr(signal, signal_name))
        assert server.process.wait(timeout=60) == code
    finally:
        server.stop()
    for client in clients:
        client.join(timeout=60)
    log = "".join(server.log[1:])
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log


def test_a_client_gone_is_noticed_while_its_tokens_keep_coming(trained_checkpoint):
    """A non-streaming client that leaves frees the server within seconds although its sequences make
    a token at every step: 1,024 of them one row at a time, run to the end, would take over a minute."""
    server = Server(trained_checkpoint("fixed_min"), "--max_batch_size=1")
    try:
        body = json.dumps({"prompt": ["ROMEO:"] * 64, "n": 16, "max_tokens": MAX_TOKENS_CAP, "temperature": 0})
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            time.sleep(0.5)  # the server reads the request and its sequences start
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:  # queued behind what is left of the 1,024 sequences
            connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 1}))
            assert connection.getresponse().status == 200
        finally:
            connection.close()
        assert time.monotonic() - started < 15
    finally:
        server.stop()


def test_a_client_that_resets_its_connection_leaves_no_traceback(server, normal_answer):
    """A client that closes its connection with the answer unread sends a reset, which the server meets
    reading the connection's next request: the client is gone, no error (http.server printed one)."""
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    before = sum("Traceback" in line for line in server.log)
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        select.select([client], [], [], 60)  # the answer has come
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    normal_answer()  # the server answers on, after it met the reset
    assert sum("Traceback" in line for line in server.log) == before, "".join(server.log)


# ------------------------------------------------------------------------------------ end of text

@pytest.fixture(scope="module")
def eot_server(trained_checkpoint, tmp_path_factory):
    """A server of the tiny checkpoint with its end-of-text logit raised, so that its next token after
    (almost) any text is <|endoftext|>; and a queue of 2 sequences."""
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    model = build_model(checkpoint)
    final = []  # what the lm_head reads, on some text: the end-of-text row is moved towards its mean
    hook = model.norm_f.register_forward_hook(lambda module, inputs, output: final.append(output[0]))
    with torch.no_grad():
        model(torch.tensor([get_encoding("bytes").encode(shakespeare_text()[:64])]))
        hook.remove()
        direction = final[0].mean(0)
        model.lm_head.weight[256] += 50 * direction / direction.norm()
    checkpoint["model"] = model.state_dict()
    out_dir = tmp_path_factory.mktemp("eot")
    torch.save(checkpoint, out_dir / "ckpt.pt")
    server = Server(str(out_dir), "--max_queue=2")
    try:
        yield server, model
    finally:
        server.stop()


def test_generated_end_of_text_is_in_logprobs(eot_server):
    """lm-evaluation-harness sums token_logprobs[context_length:-1]: the last entry must be the
    generated token, <|endoftext|> included, or the harness drops an answer token instead."""
    server, model = eot_server
    encoding = get_encoding("bytes")
    ids = encoding.encode(shakespeare_text()[100:130]) + encoding.encode(" the king")
    expected, scores = model_logprobs(model, ids)
    assert scores[-1].argmax().item() == 256  # the checkpoint prefers end-of-text here
    answer = server.complete(prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    [choice] = answer.choices
    assert len(choice.logprobs.token_logprobs) == len(ids) + 1
    assert choice.logprobs.tokens[-1] == "<|endoftext|>"
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(scores[-1, 256].item(), abs=1e-5)
    assert choice.logprobs.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-5)
    assert choice.text == encoding.decode(ids) and choice.finish_reason == "stop"
    assert answer.usage.completion_tokens == 0


def test_a_request_larger_than_the_queue_gets_400(eot_server):
    server, _ = eot_server
    with pytest.raises(openai.BadRequestError) as error:
        server.complete(prompt="x", max_tokens=1, n=3)
    assert "--max_queue=2" in error.value.body["message"]
    assert server.complete(prompt="x", max_tokens=1, n=2).choices[1].index == 1


def test_a_flood_is_queued_or_refused_and_the_server_lives_on(eot_server):
    """32 sequences at once against a queue of 2: each request is answered, 200 or a 503 queue_full."""
    server, _ = eot_server
    body = json.dumps({"prompt": "x", "max_tokens": 1, "n": 2}).encode()
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda _: server.raw("POST", "/v1/completions", body), range(16)))
    for status, answer in answers:
        assert status == 200 or (status == 503 and answer["error"]["code"] == "queue_full")
    assert server.complete(prompt="x", max_tokens=1).choices[0].finish_reason in ("stop", "length")


def test_logprobs_fit_block_size_plus_the_token_picked_last(server):
    block_size = 64
    answer = server.complete(prompt=[[65] * block_size], max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(answer.choices[0].logprobs.token_logprobs) == block_size + 1
    with pytest.raises(openai.BadRequestError):
        server.complete(prompt=[[65] * block_size], max_tokens=2, echo=True, logprobs=1, temperature=0)


# ------------------------------------------------------------------------- lm-evaluation-harness

def lm_eval_samples(output_path):
    """{task: [per-request loglikelihoods of each document, in doc_id order]} from lm_eval --log_samples."""
    samples = {}
    for path in sorted(glob.glob(os.path.join(output_path, "**", "samples_*.jsonl"), recursive=True)):
        task = re.match(r"samples_(.+)_\d{4}-", os.path.basename(path)).group(1)
        docs = sorted((json.loads(line) for line in open(path)), key=lambda doc: doc["doc_id"])
        samples[task] = [float(r[0] if isinstance(r, list) else r) for doc in docs for r in doc["filtered_resps"]]
    return samples


def test_lm_eval_through_the_server_matches_the_hf_export(server, tmp_path):
    """docs/serving.md's two lm_eval commands on the bundled local tasks (multiple choice and rolling
    perplexity): local-completions against serve.py, with no tokenizer given, and hf on the export."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    subprocess.run([sys.executable, "export_hf.py", f"--out_dir={server.out_dir}", f"--hf_dir={tmp_path / 'hf'}"],
                   cwd=REPO, check=True, capture_output=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    tasks = ["--tasks", "shakespeare_lines,shakespeare_speeches", "--include_path", "assets/lm_eval", "--log_samples"]
    routes = {
        "serve": ["--model", "local-completions", "--model_args", f"base_url=http://127.0.0.1:{server.port}/v1/"
                  f"completions,model={server.name},max_length=65,num_concurrent=4"],
        "hf": ["--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32,"
               f"max_length=63", "--device", "cpu"],
    }
    runs = {name: subprocess.Popen([sys.executable, "-m", "lm_eval", *args, *tasks,
                                    "--output_path", str(tmp_path / name)],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, args in routes.items()}  # side by side: most of each run is importing the harness
    for name, run in runs.items():
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, f"lm_eval --model {routes[name][1]} failed:\n{output[-3000:]}"
    served, exported = lm_eval_samples(str(tmp_path / "serve")), lm_eval_samples(str(tmp_path / "hf"))
    assert set(served) == set(exported) == {"shakespeare_lines", "shakespeare_speeches"}
    for task in served:
        assert len(served[task]) == len(exported[task]) > 0
        assert served[task] == pytest.approx(exported[task], rel=1e-6, abs=2e-5)


def test_bench_serve_prints_its_table(server):
    result = subprocess.run([sys.executable, "bench_serve.py", f"--out_dir={server.out_dir}", "--clients=1,2",
                             "--rounds=1", "--repeats=1", "--max_tokens=4", "--prompt_tokens=4"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    per_second = result.stdout.split("\n\n")[1]  # the first table; a second, per CPU-second, may follow
    ratios = r"[\d.]+x \| [\d.]+x \| [\d.]+x \| \d+% \| \d+% \|"  # vs 1: served, step, engine; served / each
    rows = re.findall(r"^\| (\d+) \| \d+ \| [\d,]+ \| " + ratios, per_second, re.M)
    assert rows == ["1", "2"]  # both baselines, the engine's step and the engine alone, were timed


def test_the_step_baseline_decodes_every_row_it_counts(model, monkeypatch):
    """bench_serve's step baseline counts a token per row at each step: every row, of its different
    lengths, must be in the prefill and then in every timed step."""
    (net, _), running, step = model, [], bench_serve.Engine.step

    def counted(engine, newcomers):
        step(engine, newcomers)
        running.append(len(engine.running))

    monkeypatch.setattr(bench_serve.Engine, "step", counted)
    for rows in (4, 16):
        running.clear()
        bench_serve.step_rate(net, rows, rows, {"max_tokens": 16, "prompt_tokens": 8}, torch.device("cpu"),
                              torch.float32, torch.Generator().manual_seed(0))
        assert running[:-1] == [rows] * (len(running) - 1)  # the last step ends them all


def test_a_short_soak_holds(trained_checkpoint):
    """bench_serve.py --soak, short: 8 clients send the mix twice over (46 requests) to a server of 4
    rows, so sequences queue, join and leave at every step: every greedy answer, whole or streamed, is
    the same request's answer alone, and nothing fails but what the soak provoked."""
    requests = 2 * len(bench_serve.CYCLE)
    result = subprocess.run([sys.executable, "bench_serve.py", f"--out_dir={trained_checkpoint('fixed_min')}",
                             "--soak=300", "--soak_clients=8", f"--soak_requests={requests}", "--max_tokens=16",
                             "--serve_args=--max_batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"^\| (\w+)(?: \(provoked\))? \| (\d+) \| 0 \|", result.stdout, re.MULTILINE))
    assert rows == {kind: str(2 * count) for kind, count in bench_serve.MIX.items()}
    assert f"requests {requests}, problems 0; greedy answers compared with their alone answers 24" in result.stdout
    assert re.search(r"server memory \(resident\): start \d+ MiB, after warm-up \d+ MiB, end \d+ MiB", result.stdout)


def test_a_connection_torn_down_under_its_thread_is_not_a_traceback(capsys):
    """When the server stops while a thread is just taking a connection, the socket is closed under it
    (EBADF in socketserver's setup): that is said nowhere; any other exception in a request still is."""
    server = serve.listen("127.0.0.1", 0)
    try:
        for error, said in ((OSError(9, "Bad file descriptor"), False), (ConnectionResetError(), False),
                            (RuntimeError("a bug"), True)):
            try:
                raise error
            except Exception:
                server.handle_error(None, ("127.0.0.1", 1))
            assert ("Traceback" in capsys.readouterr().err) == said, error
    finally:
        server.server_close()
