"""
Serve a checkpoint over the OpenAI-compatible completions API (what SGLang and vLLM offer), so the
`openai` client and lm-evaluation-harness's `local-completions` model can talk to it, many at once:

    python serve.py --out_dir=out-quickstart --port=8000
    python serve.py --out_dir=out-quickstart --host=0.0.0.0 --max_batch_size=16 --help

Flags are --key=value (or config files of assignments) over SETTINGS below; --help lists them.

Routes. GET /v1/models; POST /v1/completions with prompt (a string, a list of strings, a list of
token ids or a list of such lists), max_tokens (default 16), temperature (default 1; 0 = greedy),
top_p, top_k (vLLM's extension; None, 0 or -1 = off), stop (a string or a list), seed, n, stream
(server-sent events ending in `data: [DONE]`), stream_options.include_usage, echo and logprobs. At the
server root, as vLLM has them: GET /tokenizer_info, POST /tokenize {"prompt"} -> {"tokens"} and POST
/detokenize {"tokens"} -> {"prompt"}, which lm-evaluation-harness finds and uses as its tokenizer.
Anything else, any method, gets OpenAI's error object {"error": {"message", "type", "param", "code"}}.

What the answers mean:
- Prompts are encoded like sample.py's (the literal <|endoftext|> is the document boundary; '' is a
  new document), and a greedy completion is exactly sample.py --temperature=0's continuation. The
  model field is accepted and ignored: a server holds one model.
- logprobs=k gives OpenAI's legacy object {tokens, token_logprobs, top_logprobs, text_offset}: the
  log-probability of each token under the model's own distribution (before temperature, top-k or
  top-p), and the k most likely tokens at each position. With echo the prompt's tokens come first and
  the first has None. A generated <|endoftext|> ends the choice: it is not in the text, but it is in
  logprobs, last. echo + max_tokens=1 + logprobs is lm-evaluation-harness's loglikelihood: one
  forward pass scores the prompt and picks the next token. A logprobs request must fit the context:
  prompt + max_tokens <= block_size + 1, as the last new token is picked but never read; text_offset
  counts characters into the choice's text (the byte tokens of one character all have its offset).
- A prompt longer than block_size is cropped from the left for generation, as in sample.py (usage
  still counts all its tokens); with logprobs it is refused, since scores of cropped tokens would
  silently be missing.
- Choice i of a request with seed s samples with its own generator seeded s + i, so the same request
  gives the same choices however many others share its batch; each s + i must be a seed torch takes,
  -2**63 to 2**64 - 1.
- Unknown fields are ignored, as OpenAI-compatible servers do; known fields of the wrong type or out
  of range, and features this server lacks (suffix, logit_bias, penalties, best_of), get a 400.

Continuous batching (engine.py's Engine, on a thread of its own): every choice in flight is one
sequence, one row of a KV cache of max_batch_size rows (fewer if kv_cache_mib cannot hold that many),
decoded together with the others at every step; new ones are prefilled together, up to
prefill_tokens per step. A choice that ends frees its row at once, and so does one whose client went
away (noticed at its next write, or within a second, busy or not). Choices that find every row taken
wait in a first-come queue; past max_queue a request gets a 503 "queue_full" (and one that could never
fit, a 400). A request alone runs the same forward passes as sample.py; in a batch, padding and
per-row attention can move a logit by float32 rounding, which could only flip a greedy token at a
near tie.

Why the standard library's http.server: the API is a few routes of JSON and server-sent events; each
connection has its own thread, which waits on its sequences' events while the engine computes (woken
per token for a stream or stop strings, else once a sequence ends: see Inbox).
"""
import codecs
import collections
import errno
import json
import math
import os
import queue
import select
import signal
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from checkpoint import load_for_inference
from common import (DEVICE_HELP, DTYPE_HELP, THREADS_HELP, TORCH_SEEDS, UserError, autocast, device_text,
                    resolve_device, resolve_dtype, run_folder, run_main, set_threads, signal_of)
from configurator import parse_config, split_settings
from engine import Engine, KVCache, QueueFull, Sequence
from tokenizer import ENDOFTEXT, TextStream, encode_prompt

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder holding ckpt.pt (or a path to a ckpt.pt)"),
    "host": ("127.0.0.1", "address to listen on; 0.0.0.0 opens the server to the network"),
    "port": (8000, "port to listen on, 0..65535; 0 picks a free one (printed on stderr)"),
    "device": ("auto", DEVICE_HELP),
    "dtype": ("auto", DTYPE_HELP),
    "threads": (0, THREADS_HELP),
    "model_name": ("", "the model id in answers; '': the out_dir's folder name"),
    "max_tokens_cap": (None, "the largest max_tokens a request may ask for; None: block_size"),
    "max_body_bytes": (4_000_000, "larger request bodies get a 413"),
    "max_batch_size": (64, "sequences decoded together in one forward pass, at most"),
    "kv_cache_mib": (1024, "memory for the KV cache rows, allocated at start; fewer rows than max_batch_size "
                           "when it cannot hold them"),
    "max_queue": (1024, "sequences that may wait for a row; a request that would exceed it gets a 503"),
    "prefill_tokens": (2048, "prompt tokens (padding included) prefilled per step, at most one prompt more: "
                             "bounds how long new prompts stall the running sequences"),
    "log_requests": (False, "print a line per request on stderr (http.server's), as a busy server makes many"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)

MAX_N = 16            # choices per prompt
MAX_LOGPROBS = 20     # top tokens per position (vLLM's default; OpenAI allows 5)
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read and dropped, so its sender sees the 413
UNSUPPORTED = {  # fields this server does not implement -> the values that mean "not used"
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "best_of": (None, 1),
}
ROUTES = "GET /v1/models, POST /v1/completions, GET /tokenizer_info, POST /tokenize and POST /detokenize"
# The engine thread lets go of the GIL in every torch op and mostly takes it back before a waiting
# thread has woken, so a connection's thread gets it only once the switch interval has run out (5 ms
# by default), at each of its wake-ups (accept, read, answer): a tenth of that hands a finished
# request's row on to the next request sooner.
SWITCH_INTERVAL_S = 0.0005


# -------------------------------------------------------------------------------- request validation

class RequestError(Exception):
    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Prompt:
    ids: list
    text: str


@dataclass
class Completion:
    prompts: list
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list
    seed: int
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int


def get(body, name, kinds, default, describe):
    """body[name] if it has one of the JSON types kinds (null or missing: default), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    wrong_bool = isinstance(value, bool) and bool not in kinds  # JSON true is not the number 1
    if not isinstance(value, kinds) or wrong_bool or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"'{name}' must be {describe}, got {json.dumps(value)}", param=name)
    return value


def require(ok, name, message):
    if not ok:
        raise RequestError(f"'{name}' {message}", param=name)


def token_ids(value, n_vocab, name):
    """value if it is a list of token ids of this vocabulary, else a 400."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{name}' must be a list of token ids", param=name)
    bad = [t for t in value if not 0 <= t < n_vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside this model's vocabulary 0..{n_vocab - 1}", param=name)
    return value


def parse_prompts(value, encoding):
    describe = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(f"'prompt' must be {describe}", param="prompt")
    prompts = []
    for item in value:
        if isinstance(item, str):
            prompts.append(Prompt(encode_prompt(encoding, item), item))
        elif isinstance(item, list):
            ids = token_ids(item, encoding.n_vocab, "prompt")
            if not ids:
                raise RequestError("'prompt' holds an empty list of token ids: send [<|endoftext|>'s id] to start "
                                   "from a document boundary", param="prompt")
            prompts.append(Prompt(ids, encoding.decode(ids, errors="replace")))
        else:
            raise RequestError(f"'prompt' must be {describe}", param="prompt")
    return prompts


def parse_completion(body, encoding, block_size, max_tokens_cap):
    """A Completion from a request body (a dict), or a RequestError saying what is wrong."""
    if "prompt" not in body:
        raise RequestError("'prompt' is required", param="prompt")
    for name, unused in UNSUPPORTED.items():
        if body.get(name) not in unused:
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    get(body, "model", (str,), None, "a string")  # checked, then ignored: one model per server
    number, integer = (int, float), (int,)
    stop = get(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    require(all(isinstance(s, str) and s for s in stop), "stop", "must hold non-empty strings")
    options = get(body, "stream_options", (dict,), {}, "an object")
    request = Completion(
        prompts=parse_prompts(body["prompt"], encoding),
        max_tokens=get(body, "max_tokens", integer, 16, "an integer"),
        temperature=get(body, "temperature", number, 1.0, "a number"),
        top_p=get(body, "top_p", number, 1.0, "a number"),
        top_k=get(body, "top_k", integer, -1, "an integer"),
        stop=stop,
        seed=get(body, "seed", integer, None, "an integer"),
        n=get(body, "n", integer, 1, "an integer"),
        stream=get(body, "stream", (bool,), False, "true or false"),
        include_usage=get(options, "include_usage", (bool,), False, "true or false"),
        echo=get(body, "echo", (bool,), False, "true or false"),
        logprobs=get(body, "logprobs", integer, None, "an integer (the number of top tokens)"),
    )
    require(request.max_tokens >= 0, "max_tokens", "must be 0 or more")
    if request.max_tokens > max_tokens_cap:
        raise RequestError(f"'max_tokens' is {request.max_tokens}, more than this server allows "
                           f"({max_tokens_cap}; the model's context is {block_size} tokens)",
                           param="max_tokens", code="context_length_exceeded")
    require(request.temperature >= 0, "temperature", "must be 0 (greedy) or more")
    require(0 < request.top_p <= 1, "top_p", "must be in (0, 1]")
    require(request.top_k >= -1, "top_k", "must be -1 or 0 (off) or a positive count")
    require(1 <= request.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
    if request.seed is not None:  # choice i samples with seed + i: the last one must be a seed torch takes too
        choices = len(request.prompts) * request.n
        lowest, highest = TORCH_SEEDS
        require(lowest <= request.seed <= highest - (choices - 1), "seed",
                f"must be between {lowest} and {highest - (choices - 1)} (torch's seeds go up to {highest}, "
                f"and choice i of {choices} samples with seed + i)")
    if request.logprobs is not None:
        require(0 <= request.logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        require(not request.stream, "logprobs", "is not supported with stream=true")
        longest = max(len(p.ids) for p in request.prompts)
        if longest + max(request.max_tokens, 1) - 1 > block_size:  # the last new token is picked, never read
            raise RequestError(f"with logprobs, prompt ({longest} tokens) + max_tokens ({request.max_tokens}) "
                               f"must fit the model's context of {block_size} tokens plus the one picked last",
                               param="prompt", code="context_length_exceeded")
    return request


# ---------------------------------------------------------------------------------- response shaping

class Choice:
    """One choice's answer, built from its sequence's events: text as it becomes final (all bytes of a
    character arrived, never the start of a stop string), the tokens kept, finish_reason, scores."""

    def __init__(self, index, prompt, request, encoding):
        self.index, self.prompt, self.request, self.encoding = index, prompt, request, encoding
        self.stream = TextStream(encoding)
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be arriving
        self.text, self.sent, self.tokens, self.starts, self.scores = "", 0, [], [], []
        self.prompt_scores, self.finish = None, None

    def add(self, event):
        """The text this event makes final ('' if none)."""
        kind = event[0]
        if kind == "prompt":
            self.prompt_scores = event[1:]
        elif kind == "token":
            token, logprob, top = event[1:]
            self.scores.append((token, logprob, top))
            if token != self.encoding.eot_token:  # the end of the document ends the text, without text of its own
                self.tokens.append(token)
                self.starts.append(len(self.text))
                self.text += self.stream.add(token)
                self.cut_at_stop()
        elif kind == "end":
            self.finish = event[1]
        if self.finish is not None:
            self.text += self.stream.finish()  # a character left incomplete shows as U+FFFD
            return self.text[self.sent:]
        final = max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:final], final
        return piece

    def cut_at_stop(self):
        since = max(0, self.starts[-1] - self.hold)
        hits = [i for i in (self.text.find(s, since) for s in self.request.stop) if i >= 0]
        if hits:  # the stop string and all after it go; so do the tokens that only made those
            self.text, self.finish = self.text[:min(hits)], "stop"
            kept = sum(1 for start in self.starts if start < len(self.text))
            self.tokens, self.starts, self.scores = self.tokens[:kept], self.starts[:kept], self.scores[:kept]
            self.stream = TextStream(self.encoding)  # nothing pending after the cut may show

    def body(self):
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self.logprobs()
        return {"index": self.index, "text": self.prompt.text + self.text if self.request.echo else self.text,
                "logprobs": logprobs, "finish_reason": self.finish}

    def logprobs(self):
        """OpenAI's legacy logprobs object: the prompt's tokens first with echo, then the generated ones."""
        rows = []  # (token, logprob, top)
        if self.request.echo:
            picked, tops = self.prompt_scores
            rows = [(self.prompt.ids[0], None, None)] + list(zip(self.prompt.ids[1:], picked, tops))
        rows += self.scores
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset, characters = 0, codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token, logprob, top in rows:
            result["tokens"].append(token_text(self.encoding, token))
            result["text_offset"].append(offset)  # a token inside a character: that character's offset
            offset += len(characters.decode(self.encoding.decode_single_token_bytes(token)))
            result["token_logprobs"].append(logprob)
            result["top_logprobs"].append(None if top is None else {token_text(self.encoding, t): v for t, v in top})
        return result


def token_text(encoding, token):
    return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def usage(request, choices):
    prompt_tokens = sum(len(p.ids) for p in request.prompts)
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tokenizer_info(encoding, block_size):
    """What vLLM's /tokenizer_info gives and lm-evaluation-harness's RemoteTokenizer reads (eos, bos, pad)."""
    return {"tokenizer_class": f"tiktoken:{encoding.name}", "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT, "model_max_length": block_size, "vocab_size": encoding.n_vocab}


# -------------------------------------------------------------------------------------------- HTTP

class Inbox:
    """Where the engine thread puts the events of one request's sequences (their Sequence.events). Its
    reader wakes at every event only when it acts on each one (a stream, stop strings), else when a
    sequence ends or fails: a woken thread takes the GIL, and often the core, from the engine thread,
    which on a busy server would be once per row at every step."""

    def __init__(self, wake_per_token):
        self.events, self.bell, self.wake_per_token = collections.deque(), queue.SimpleQueue(), wake_per_token

    def put(self, event):  # in the engine thread, per token: a deque and a SimpleQueue take no Python lock
        self.events.append(event)
        if self.wake_per_token or event[1][0] != "token":
            self.bell.put(None)

    def take(self, timeout):
        """The events so far, once one that wakes the reader has come or timeout seconds have passed."""
        try:
            self.bell.get(timeout=timeout)
        except queue.Empty:
            pass
        for _ in range(self.bell.qsize()):  # rung for events taken below: each event is in before its ring
            self.bell.get()
        return [self.events.popleft() for _ in range(len(self.events))]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's connection pool expects
    timeout = 120  # seconds a client may stall mid-request before its connection is dropped

    def setup(self):
        super().setup()
        # Headers and body go out in two writes; without this, Nagle's algorithm holds the second until
        # the client's delayed ACK, 40 ms per small answer (what the harness's /tokenize calls are).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        """http.server's loop over a connection's requests, where a client that resets the connection
        (one that closes it with an answer unread) is gone, not an error with a traceback on stderr."""
        try:
            super().handle()
        except ConnectionError:
            self.close_connection = True

    def route(self):
        return urlsplit(self.path).path.rstrip("/")

    def do_GET(self):
        server = self.server
        if self.route() == "/v1/models":
            model = {"id": server.name, "object": "model", "created": 0, "owned_by": "fixed-code-lm",
                     "max_model_len": server.block_size}
            self.send_json(200, {"object": "list", "data": [model]})
        elif self.route() == "/tokenizer_info":
            self.send_json(200, tokenizer_info(server.encoding, server.block_size))
        elif self.route() in ("/v1/completions", "/tokenize", "/detokenize"):
            self.send_json(405, error_body(f"use POST for {self.route()}", code="method_not_allowed"))
        else:
            self.send_json(404, error_body(f"no route GET {self.path}: this server has {ROUTES}", code="not_found"))

    def do_POST(self):
        try:
            body = self.read_json()
            route = self.route()
            if route == "/v1/completions":
                request = parse_completion(body, self.server.encoding, self.server.block_size,
                                           self.server.max_tokens_cap)
                self.complete(request)
            elif route == "/tokenize":
                prompt = get(body, "prompt", (str,), None, "a string")
                require(prompt is not None, "prompt", "is required")
                tokens = self.server.encoding.encode(prompt, allowed_special={ENDOFTEXT})
                self.send_json(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.server.block_size})
            elif route == "/detokenize":
                tokens = token_ids(body.get("tokens"), self.server.encoding.n_vocab, "tokens")
                self.send_json(200, {"prompt": self.server.encoding.decode(tokens, errors="replace")})
            elif route == "/tokenizer_info" or route == "/v1/models":
                raise RequestError(f"use GET for {route}", status=405, code="method_not_allowed")
            else:
                raise RequestError(f"no route POST {self.path}: this server has {ROUTES}", status=404,
                                   code="not_found")
        except RequestError as e:
            self.send_json(e.status, error_body(str(e), e.param, e.code))
        except QueueFull as e:
            self.send_json(503, error_body(str(e), code="queue_full", kind="server_error"), retry_after=1)
        except OSError:  # the client went away or stalled past the timeout: nothing to answer
            self.close_connection = True
        except Exception as e:  # a bug: say so, and keep serving the other requests
            traceback.print_exc()
            self.send_json(500, error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    def send_error(self, code, message=None, explain=None):
        """http.server's own answers (an unknown method, a malformed request line, headers too large), as
        JSON: every method on every path gets OpenAI's error object, never an HTML page."""
        if code == 501:  # no do_<METHOD>
            code, message = 405, f"method {self.command} is not allowed: this server has {ROUTES}"
        self.close_connection = True
        self.send_json(code, error_body(message or explain or "bad request", code="method_not_allowed"
                                        if code == 405 else None), allow=code == 405)

    def read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # without a length the rest of the stream cannot be framed
            raise RequestError("send the JSON body with a Content-Length header", status=411)
        length, limit = int(length), self.server.max_body_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:
                left = length
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise RequestError(f"request body is {length} bytes, more than this server's limit of {limit} "
                               f"(--max_body_bytes)", status=413, code="request_too_large")
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    def complete(self, request):
        """Submits one sequence per choice, then turns their events into the answer, streamed or whole."""
        events, choices, sequences = Inbox(request.stream or bool(request.stop)), [], []
        for p, prompt in enumerate(request.prompts):
            for i in range(request.n):
                index = p * request.n + i
                choices.append(Choice(index, prompt, request, self.server.encoding))
                generator = None
                if request.seed is not None:
                    generator = torch.Generator(device=self.server.engine.device).manual_seed(request.seed + index)
                sequences.append(Sequence(
                    prompt.ids, request.max_tokens, events, index, temperature=request.temperature,
                    top_k=request.top_k if request.top_k > 0 else None, top_p=request.top_p, generator=generator,
                    eos_id=self.server.encoding.eot_token, logprobs=request.logprobs,
                    score_prompt=request.echo and request.logprobs is not None))
        if len(sequences) > self.server.engine.max_queue:  # it could never be queued: a 503 would ask to retry
            raise RequestError(f"this request makes {len(sequences)} sequences (prompts x n), more than the "
                               f"server queues at once (--max_queue={self.server.engine.max_queue})", param="n")
        self.server.engine.submit(sequences)
        try:
            if request.stream:
                self.stream(request, choices, sequences, events)
            else:
                for _ in self.events(choices, sequences, events):
                    pass
                self.send_json(200, {**self.head(), "choices": [c.body() for c in choices],
                                     "usage": usage(request, choices)})
        finally:  # whatever happened (a stop string, a client gone, an error), no sequence keeps its row
            for s in sequences:
                s.cancelled = True

    def events(self, choices, sequences, events):
        """(choice, text piece) as events arrive, until every choice has finished; OSError if the client
        left (looked at every second, by the clock: while the engine is busy, events never stop coming)."""
        open_, looked = len(choices), time.monotonic()
        while open_:
            arrived = events.take(timeout=1.0)
            if time.monotonic() - looked >= 1.0:
                if self.client_gone():
                    raise ConnectionAbortedError("client disconnected")
                looked = time.monotonic()
            for index, event in arrived:
                choice = choices[index]
                if choice.finish is not None:
                    continue  # events after a stop string cut it
                if event[0] == "error":
                    raise RuntimeError(event[1])
                piece = choice.add(event)
                if choice.finish is not None:
                    sequences[index].cancelled = True
                    open_ -= 1
                yield choice, piece

    def client_gone(self):
        """True if the client closed its connection (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def head(self):
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.name}

    def stream(self, request, choices, sequences, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        head = self.head()

        def send(payload):
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        def chunk(index, text, finish=None):
            send({**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]})

        try:
            if request.echo:
                for choice in choices:
                    chunk(choice.index, choice.prompt.text)
            for choice, piece in self.events(choices, sequences, events):
                if piece:
                    chunk(choice.index, piece)
                if choice.finish is not None:
                    chunk(choice.index, "", choice.finish)
            if request.include_usage:
                send({**head, "choices": [], "usage": usage(request, choices)})
        except OSError:
            raise
        except Exception as e:  # a bug, after the 200 went out: the error goes in the stream
            traceback.print_exc()
            send(error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_json(self, status, payload, retry_after=None, allow=False):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if allow:
            self.send_header("Allow", "GET, POST")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the body, not the body
            self.wfile.write(data)

    def log_message(self, format, *args):  # http.server's line per request, on stderr, when asked for
        if self.server.log_requests:
            super().log_message(format, *args)


# -------------------------------------------------------------------------------------------- main

def check_settings(cfg):
    limits = ("max_body_bytes", "max_batch_size", "kv_cache_mib", "max_queue", "prefill_tokens")
    checks = [(isinstance(cfg["port"], int) and 0 <= cfg["port"] <= 65535,
               f"port must be 0..65535 (0: any free port), got {cfg['port']!r}"),
              (bool(cfg["host"]), "host must be an address or a name, e.g. 127.0.0.1"),
              (cfg["max_tokens_cap"] is None or (isinstance(cfg["max_tokens_cap"], int)
                                                 and not isinstance(cfg["max_tokens_cap"], bool)
                                                 and cfg["max_tokens_cap"] >= 1),
               f"max_tokens_cap must be None (block_size) or a positive integer, got {cfg['max_tokens_cap']!r}")]
    checks += [(cfg[key] >= 1, f"{key} must be positive, got {cfg[key]}") for key in limits]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def cache_rows(cfg, model, dtype):
    """KV cache rows: max_batch_size, or as many whole rows as kv_cache_mib holds."""
    shape = model.config
    row_bytes = 2 * shape.n_layer * shape.block_size * shape.n_embd * torch.tensor([], dtype=dtype).element_size()
    rows = min(cfg["max_batch_size"], cfg["kv_cache_mib"] * 2 ** 20 // row_bytes)
    if rows < 1:
        raise UserError(f"kv_cache_mib={cfg['kv_cache_mib']} cannot hold one sequence of block_size "
                        f"{shape.block_size} ({row_bytes / 2 ** 20:.1f} MiB): raise it")
    return rows


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection's thread never holds up the shutdown
    request_queue_size = 1024  # connections waiting to be accepted: socketserver's 5 resets a burst of clients

    def __init__(self, host, port, family):
        self.address_family = family  # IPv4 or IPv6, as the host resolved
        super().__init__((host, port), Handler)

    def handle_error(self, request, client_address):
        # A connection torn down under its thread (the client gone, or the server stopping while a thread
        # was just taking a connection: EBADF) is not a fault of the server: no traceback on stderr.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def listen(host, port):
    """The HTTP server bound to host:port, or a UserError that says which of the two is the problem."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot resolve host '{host}' ({getattr(e, 'strerror', e)}): give an address such as "
                        f"127.0.0.1 or a name this machine resolves") from None
    try:
        return Server(host, port, family)
    except OSError as e:
        reasons = {errno.EADDRINUSE: f"port {port} is already in use on {host}: stop what holds it or pick "
                                     f"another --port (0: any free one)",
                   errno.EADDRNOTAVAIL: f"host '{host}' is not an address of this machine: use 127.0.0.1 or 0.0.0.0",
                   errno.EACCES: f"not allowed to listen on port {port} (below 1024 needs privileges): pick "
                                 f"another --port"}
        raise UserError(reasons.get(e.errno, f"cannot listen on {host}:{port}: {e.strerror}")) from None


def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    check_settings(cfg)
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    server = listen(cfg["host"], cfg["port"])  # before the model loads: a wrong address fails at once
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _, model, encoding = load_for_inference(cfg["out_dir"], device)
    set_threads(cfg["threads"], device, model, cfg["prefill_tokens"])  # its largest call: a prefill step
    rows = cache_rows(cfg, model, dtype)

    server.name = cfg["model_name"] or os.path.basename(os.path.abspath(run_folder(cfg["out_dir"])))
    server.encoding, server.block_size = encoding, model.config.block_size
    server.max_tokens_cap = cfg["max_tokens_cap"] or server.block_size
    server.max_body_bytes, server.log_requests = cfg["max_body_bytes"], cfg["log_requests"]
    cache = KVCache(model.config, rows, dtype=dtype, device=device)
    server.engine = Engine(model, cache, cfg["max_queue"], cfg["prefill_tokens"],
                           precision=lambda: autocast(device, dtype)).start()
    host, port = server.server_address[:2]
    print(f"serving {server.name} ({model.config.input_code}, block_size {server.block_size}, {device_text(device)} "
          f"{str(dtype).removeprefix('torch.')}, batches of up to {rows}) at http://{host}:{port}/v1",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt as e:
        if signal_of(e) != signal.SIGTERM:
            raise
        print("serve.py: stopped (SIGTERM)", file=sys.stderr, flush=True)  # how a service is stopped: exit code 0
    finally:  # as when idle: the engine thread ends (after its step) before the interpreter does
        server.server_close()
        server.engine.stop()


if __name__ == "__main__":
    run_main(main)
