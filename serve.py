"""
Serve a checkpoint over the OpenAI-compatible completions API (what SGLang and vLLM offer), so the
`openai` client and lm-evaluation-harness's `local-completions` model can talk to it:

    python serve.py --out_dir=out-fixed_min [--host 127.0.0.1] [--port 8000]
    lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions,max_length=1023,...

(lm-evaluation-harness scores prompts of up to max_length tokens and asks for one more token on top,
so give it max_length = block_size - 1.)

Routes: GET /v1/models, POST /v1/completions with prompt (a string, a list of strings, a list of
token ids or a list of such lists), max_tokens (default 16), temperature (default 1; 0 = greedy),
top_p, top_k (vLLM's extension; None, 0 or -1 = off), stop (a string or a list), seed, n, stream
(server-sent events ending in `data: [DONE]`), stream_options.include_usage, echo and logprobs.

What the answers mean:
- Prompts are encoded like sample.py's (the literal <|endoftext|> is the document boundary), and a
  greedy completion is exactly sample.py --temperature=0's continuation. The model field is accepted
  and ignored: a server holds one model.
- logprobs=k gives OpenAI's legacy object {tokens, token_logprobs, top_logprobs, text_offset}: the
  log-probability of each token under the model's own distribution (before temperature, top-k or
  top-p), and the k most likely tokens at each position. With echo the prompt's tokens come first and
  the first has None. echo + max_tokens=0 (or 1) + logprobs is lm-evaluation-harness's loglikelihood.
  text_offset counts characters into the choice's text. The scores come from one forward pass over
  prompt + completion, so a logprobs request must fit the context: prompt + max_tokens <= block_size.
- A prompt longer than block_size is cropped from the left for generation, as in sample.py (usage
  still counts all its tokens); with logprobs it is refused, since scores of cropped tokens would
  silently be missing.
- Unknown fields are ignored, as OpenAI-compatible servers do; known fields of the wrong type or out
  of range, and features this server lacks (suffix, logit_bias, penalties, best_of), get a 400 with
  OpenAI's error object {"error": {"message", "type", "param", "code"}}.

Concurrency: connections are handled on threads (a slow client only holds its own thread), and every
model call takes one lock, one forward pass at a time. Concurrent requests therefore interleave token
by token, each with its own KV cache (memory grows with the number of requests in flight), and no
request waits for another to finish, nor for a slowly read stream.

Why the standard library's http.server: the API is two routes of JSON and server-sent events, which
it handles in a few lines, and it keeps the repository free of a web framework and its version churn.
"""
import argparse
import codecs
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from checkpoint import CheckpointError
from configurator import ConfigError
from common import autocast, load_for_inference, resolve_device, resolve_dtype
from tokenizer import ENDOFTEXT

MAX_N = 16            # choices per prompt
MAX_LOGPROBS = 20     # top tokens per position (vLLM's default; OpenAI allows 5)
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read and dropped, so its sender sees the 413
UNSUPPORTED = {  # fields this server does not implement -> the values that mean "not used"
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "best_of": (None, 1),
}


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


def field(body, name, kinds, default, describe):
    """body[name] if it has one of the JSON types kinds (null or missing: default), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    wrong_bool = isinstance(value, bool) and bool not in kinds  # JSON true is not the number 1
    if not isinstance(value, kinds) or wrong_bool or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"'{name}' must be {describe}, got {json.dumps(value)}", param=name)
    return value


def in_range(ok, name, message):
    if not ok:
        raise RequestError(f"'{name}' {message}", param=name)


class Engine:
    """The model, its tokenizer and the rules of the completions API."""

    def __init__(self, model, encoding, device, dtype, name, max_tokens_cap):
        self.model, self.encoding, self.device, self.dtype, self.name = model, encoding, device, dtype, name
        self.block_size = model.config.block_size
        self.max_tokens_cap = max_tokens_cap or self.block_size
        self.lock = threading.Lock()

    def models(self):
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "fixed-code-lm",
                 "max_model_len": self.block_size}
        return {"object": "list", "data": [model]}

    def token_text(self, token):
        return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def parse_prompts(self, value):
        describe = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RequestError(f"'prompt' must be {describe}", param="prompt")
        prompts = []
        for item in value:
            if isinstance(item, str):
                ids = self.encoding.encode(item, allowed_special={ENDOFTEXT})
                prompt = Prompt(ids, item)
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                bad = [t for t in item if not 0 <= t < self.encoding.n_vocab]
                if bad:
                    raise RequestError(f"token id {bad[0]} is outside this model's vocabulary "
                                       f"0..{self.encoding.n_vocab - 1}", param="prompt")
                prompt = Prompt(item, self.encoding.decode(item, errors="replace"))
            else:
                raise RequestError(f"'prompt' must be {describe}", param="prompt")
            if not prompt.ids:
                raise RequestError("'prompt' is empty: send '<|endoftext|>' to start from a document boundary",
                                   param="prompt")
            prompts.append(prompt)
        return prompts

    def parse(self, body):
        """A Completion from a request body (a dict), or a RequestError saying what is wrong."""
        if "prompt" not in body:
            raise RequestError("'prompt' is required", param="prompt")
        for name, unused in UNSUPPORTED.items():
            if body.get(name) not in unused:
                raise RequestError(f"'{name}' is not supported by this server", param=name)
        field(body, "model", (str,), None, "a string")  # checked, then ignored: one model per server
        number, integer = (int, float), (int,)
        stop = field(body, "stop", (str, list), [], "a string or a list of strings")
        stop = [stop] if isinstance(stop, str) else stop
        in_range(all(isinstance(s, str) and s for s in stop), "stop", "must hold non-empty strings")
        options = field(body, "stream_options", (dict,), {}, "an object")
        request = Completion(
            prompts=self.parse_prompts(body["prompt"]),
            max_tokens=field(body, "max_tokens", integer, 16, "an integer"),
            temperature=field(body, "temperature", number, 1.0, "a number"),
            top_p=field(body, "top_p", number, 1.0, "a number"),
            top_k=field(body, "top_k", integer, -1, "an integer"),
            stop=stop,
            seed=field(body, "seed", integer, None, "an integer"),
            n=field(body, "n", integer, 1, "an integer"),
            stream=field(body, "stream", (bool,), False, "true or false"),
            include_usage=field(options, "include_usage", (bool,), False, "true or false"),
            echo=field(body, "echo", (bool,), False, "true or false"),
            logprobs=field(body, "logprobs", integer, None, "an integer (the number of top tokens)"),
        )
        in_range(request.max_tokens >= 0, "max_tokens", "must be 0 or more")
        if request.max_tokens > self.max_tokens_cap:
            raise RequestError(f"'max_tokens' is {request.max_tokens}, more than this server allows "
                               f"({self.max_tokens_cap}; the model's context is {self.block_size} tokens)",
                               param="max_tokens", code="context_length_exceeded")
        in_range(request.temperature >= 0, "temperature", "must be 0 (greedy) or more")
        in_range(0 < request.top_p <= 1, "top_p", "must be in (0, 1]")
        in_range(request.top_k >= -1, "top_k", "must be -1 or 0 (off) or a positive count")
        in_range(1 <= request.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
        if request.logprobs is not None:
            in_range(0 <= request.logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}")
            in_range(not request.stream, "logprobs", "is not supported with stream=true")
            longest = max(len(p.ids) for p in request.prompts)
            if longest + request.max_tokens > self.block_size:
                raise RequestError(f"with logprobs, prompt ({longest} tokens) + max_tokens ({request.max_tokens}) "
                                   f"must fit the model's context of {self.block_size} tokens", param="prompt",
                                   code="context_length_exceeded")
        return request

    def step(self, stream):
        """The next token id of a generate_stream, or None when it is over: one forward pass, under the lock."""
        with self.lock, autocast(self.device, self.dtype):
            token = next(stream, None)
            return None if token is None else token.item()

    def generate(self, prompt, request, generator, on_text):
        """One completion of prompt: (text, token ids, finish_reason). on_text(piece) gets the text as it
        becomes final: a character once its bytes are complete, and never the start of a stop string."""
        eot, decoder = self.encoding.eot_token, codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be arriving
        text, tokens, starts, sent, finish, cut = "", [], [], 0, "length", False
        stream = iter(())
        if request.max_tokens > 0:
            top_k = request.top_k if request.top_k > 0 else None
            stream = self.model.generate_stream(torch.tensor([prompt.ids[-self.block_size:]], device=self.device),
                                                request.max_tokens, request.temperature, top_k, request.top_p,
                                                eos_id=eot, generator=generator)
        while (token := self.step(stream)) is not None:
            if token == eot:
                finish = "stop"
                break
            tokens.append(token)
            starts.append(len(text))
            text += decoder.decode(self.encoding.decode_single_token_bytes(token))
            hits = [i for i in (text.find(s, max(0, starts[-1] - hold)) for s in request.stop) if i >= 0]
            if hits:  # the stop string and all after it go; so do the tokens that only made those
                text, finish, cut = text[:min(hits)], "stop", True
                tokens = [t for t, start in zip(tokens, starts) if start < len(text)]
                break
            if len(text) - hold > sent:
                on_text(text[sent:len(text) - hold])
                sent = len(text) - hold
        if not cut:
            text += decoder.decode(b"", final=True)  # a character left incomplete shows as U+FFFD
        if len(text) > sent:
            on_text(text[sent:])
        return text, tokens, finish

    def logprobs(self, ids, first, k):
        """OpenAI's logprobs object for ids[first:], each token scored given all the ids before it."""
        with self.lock, torch.no_grad(), autocast(self.device, self.dtype):
            logits, _ = self.model(torch.tensor([ids], device=self.device), all_logits=True)
        scores = logits[0].float().log_softmax(dim=-1)  # (T, V): row i scores token i + 1
        following = torch.tensor(ids[1:], dtype=torch.long, device=scores.device)
        picked = scores[:-1].gather(1, following[:, None]).squeeze(1).tolist()
        top = scores[:-1].topk(k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for i in range(first, len(ids)):
            text = self.token_text(ids[i])
            result["tokens"].append(text)
            result["text_offset"].append(offset)
            offset += len(text)
            result["token_logprobs"].append(picked[i - 1] if i > 0 else None)
            result["top_logprobs"].append({self.token_text(t): v for t, v in zip(top_ids[i - 1], top_values[i - 1])}
                                          if i > 0 else None)
        return result

    def run(self, request, on_text=lambda index, piece: None):
        """(choices, usage) of a request; choices are ordered prompt by prompt, n per prompt, as OpenAI does."""
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        choices, completion_tokens = [], 0
        for p, prompt in enumerate(request.prompts):
            for s in range(request.n):
                index = p * request.n + s
                if request.echo:
                    on_text(index, prompt.text)
                text, tokens, finish = self.generate(prompt, request, generator, lambda piece: on_text(index, piece))
                completion_tokens += len(tokens)
                choice = {"index": index, "text": prompt.text + text if request.echo else text, "logprobs": None,
                          "finish_reason": finish}
                if request.logprobs is not None:
                    first = 0 if request.echo else len(prompt.ids)
                    choice["logprobs"] = self.logprobs(prompt.ids + tokens, first, request.logprobs)
                choices.append(choice)
        prompt_tokens = sum(len(p.ids) for p in request.prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return choices, usage


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's connection pool expects
    timeout = 120  # seconds a client may stall mid-request before its connection is dropped

    def route(self):
        return urlsplit(self.path).path.rstrip("/")

    def do_GET(self):
        if self.route() == "/v1/models":
            self.send_json(200, self.server.engine.models())
        elif self.route() == "/v1/completions":
            self.send_json(405, error_body("use POST for /v1/completions", code="method_not_allowed"))
        else:
            self.send_json(404, error_body(f"no route GET {self.path}: this server has GET /v1/models and "
                                           f"POST /v1/completions", code="not_found"))

    def do_POST(self):
        try:
            body = self.read_json()
            if self.route() != "/v1/completions":
                raise RequestError(f"no route POST {self.path}: this server has POST /v1/completions", status=404,
                                   code="not_found")
            request = self.server.engine.parse(body)
            if request.stream:
                self.stream(request)
            else:
                self.complete(request)
        except RequestError as e:
            self.send_json(e.status, error_body(str(e), e.param, e.code))
        except OSError:  # the client went away or stalled past the timeout: nothing to answer
            self.close_connection = True
        except Exception as e:  # a bug: say so, and keep serving the other requests
            traceback.print_exc()
            self.send_json(500, error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"))

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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    def head(self):
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.engine.name}

    def complete(self, request):
        choices, usage = self.server.engine.run(request)
        self.send_json(200, {**self.head(), "choices": choices, "usage": usage})

    def stream(self, request):
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
            choices, usage = self.server.engine.run(request, on_text=chunk)
            for choice in choices:
                chunk(choice["index"], "", choice["finish_reason"])
            if request.include_usage:
                send({**head, "choices": [], "usage": usage})
        except OSError:
            raise
        except Exception as e:  # a bug, after the 200 went out: the error goes in the stream
            traceback.print_exc()
            send(error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    parser = argparse.ArgumentParser(description="Serve a checkpoint over the OpenAI completions API.")
    parser.add_argument("--out_dir", required=True, help="run folder holding ckpt.pt (or a ckpt.pt path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: open to the network)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stderr)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--dtype", default="auto", help="'auto', 'float32', 'bfloat16' or 'float16'")
    parser.add_argument("--model_name", default=None, help="the model id in answers (default: the out_dir's name)")
    parser.add_argument("--max_tokens_cap", type=int, default=None, help="largest max_tokens (default: block_size)")
    parser.add_argument("--max_body_bytes", type=int, default=4_000_000, help="larger request bodies get a 413")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        _, model, encoding = load_for_inference(args.out_dir, device)
        name = args.model_name or os.path.basename(os.path.normpath(os.path.abspath(args.out_dir)))
        engine = Engine(model, encoding, device, dtype, name, args.max_tokens_cap)
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"serve.py: error: {e}")
    except OSError as e:
        sys.exit(f"serve.py: error: cannot listen on {args.host}:{args.port} ({e.strerror}): pick another --port")
    server.engine, server.max_body_bytes = engine, args.max_body_bytes
    host, port = server.server_address[:2]
    print(f"serving {name} ({model.config.input_code}, block_size {engine.block_size}, {device} {dtype}) at "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
