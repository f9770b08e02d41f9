"""
Inference on token ids: the KV cache whose rows may hold sequences of different lengths, sampling,
and the continuous-batching Engine, the one generation path: serve.py runs it on a thread for its
requests, and generate_stream runs it in the caller's for a batch of prompts (sample.py, bench.py).
It knows the model, not tokenization nor HTTP: ids in, ids and their scores out.

Continuous batching. Every sequence in flight holds one row of the KV cache. At each step every
running sequence decodes its next token in one batched forward pass; then sequences whose row is full
re-read their last block_size tokens, exactly what a model that crops its input would see, and new
sequences are prefilled together (right-padded, up to prefill_tokens per step), decoding from the
next step on. A finished or cancelled sequence frees its row at once. Sequences that find every row
taken wait in a first-come queue, so a stream of newcomers cannot starve them. Each sequence keeps
its own sampling settings, generator, end token and logprobs. A sequence alone runs the same forward
passes as in any batch of equal lengths; rows of different lengths are padded and masked, which can
move a logit by float32 rounding (under 1e-5 nats on the tests' model) and so could only flip a
greedy token at a near tie.

The model reads a cache through three calls (model.py's GPT.forward and attention): begin(B, T,
device) before a forward of T tokens on rows 0..B-1 gives their positions; update(layer, k, v) in
each layer stores the new keys and values and gives back all of them with the attention's mask and
whether it is plain causal; advance(B, T) after the forward counts the tokens in.
"""
import collections
import contextlib
import queue
import threading
import traceback
from dataclasses import dataclass, field

import torch


# ------------------------------------------------------------------------------------- the KV cache

class KVCache:
    """Keys and values of every layer for batch_size rows of up to block_size positions each.

    lengths[b] is how many positions row b holds. A forward pass of T tokens on rows 0..B-1 puts row
    b's at positions lengths[b] .. lengths[b] + T - 1, each attending to its own row up to itself. So
    one cache can hold sequences of different lengths (serve.py batches them); generate_stream's rows
    all have one length, and then attention is plain causal attention on slices, as without a cache.
    """

    def __init__(self, config, batch_size, dtype=None, device=None):
        self.shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.block_size = config.block_size
        self.k = self.v = None
        if dtype is not None:  # allocated now (serve.py's fixed budget); else at the first write
            self.k = torch.zeros(self.shape, dtype=dtype, device=device)
            self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self.lengths = [0] * batch_size
        self.positions = self.end = 0  # set by begin(): where the next forward's tokens go, and the keys' end

    def rows(self, first, count):
        """A cache over rows first .. first + count - 1 of this one, sharing its memory, starting empty:
        what a batch of new prompts is prefilled into."""
        view = KVCache.__new__(KVCache)
        view.shape, view.block_size = (self.shape[0], count, *self.shape[2:]), self.block_size
        view.k, view.v = self.k[:, first:first + count], self.v[:, first:first + count]
        view.lengths, view.positions, view.end = [0] * count, 0, 0
        return view

    def move(self, dst, src):
        """Row dst becomes a copy of row src (a finished sequence's row is refilled by the last one,
        so the sequences in flight stay in rows 0..n-1)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def begin(self, B, T, device):
        """Before a forward of T tokens on rows 0..B-1: their positions, as an int when all rows are at
        the same one (then slices do), else a (B, T) tensor."""
        starts = self.lengths[:B]
        if max(starts) + T > self.block_size:
            raise ValueError(f"sequence of {max(starts) + T} tokens is longer than block_size {self.block_size}")
        self.end = max(starts) + T
        if min(starts) == max(starts):
            self.positions = starts[0]
        else:  # rows of different lengths: the same positions and mask for every layer, made once here
            self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
            self.row_index = torch.arange(B, device=device)[:, None]
            hidden = torch.arange(self.end, device=device) > self.positions[:, None, :, None]  # (B, 1, T, end)
            # additive, in the keys' dtype: attention would turn a boolean mask into this in every layer
            self.mask = torch.zeros(hidden.shape, dtype=self.k.dtype, device=device).masked_fill_(hidden, float("-inf"))
        return self.positions

    def update(self, layer, k, v):
        """Writes (B, nh, T, hs) at the positions of begin(); returns all keys and values of those rows
        so far, the attention mask (None: all visible) and whether attention is plain causal."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        B, T = k.size(0), k.size(2)
        if isinstance(self.positions, int):
            start = self.positions
            self.k[layer, :B, :, start:start + T] = k
            self.v[layer, :B, :, start:start + T] = v
            keys, values = self.k[layer, :B, :, :self.end], self.v[layer, :B, :, :self.end]
            # Python branches, not a bool expression: under torch.compile, with lengths and T symbolic, an
            # `if` becomes a guard, while a bool passed as is_causal would be symbolic, which SDPA rejects.
            if start == 0:  # the first tokens: keys are exactly the queries, plain causal attention
                return keys, values, None, True
            if T == 1:  # one new token sees every key
                return keys, values, None, False
            mask = torch.arange(self.end, device=k.device) <= start + torch.arange(T, device=k.device)[:, None]
            return keys, values, mask, False  # new queries after cached ones: query i sees keys up to start + i
        # (B, T, nh, hs) at each row's own positions
        self.k[layer][self.row_index, :, self.positions] = k.transpose(1, 2)
        self.v[layer][self.row_index, :, self.positions] = v.transpose(1, 2)
        return self.k[layer, :B, :, :self.end], self.v[layer, :B, :, :self.end], self.mask, False

    def advance(self, B, T):
        for b in range(B):
            self.lengths[b] += T


# ------------------------------------------------------------------------------------------ sampling

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B, 1) ids: greedy when temperature is 0, else softmax sampling of the
    top_k most likely ids and the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # The top logit moved to 0 first, so that dividing gives 0 or less, never inf or nan: a temperature
    # too small for float32 (below its smallest normal, or rounding to 0) samples the top token, as greedy.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        drop = before >= top_p
        drop[:, 0] = False  # the top one always stays, also when top_p rounds to 0 in float32
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


# ----------------------------------------------------------------------------- continuous batching

@dataclass
class Sequence:
    """One sequence to generate, in token ids, with its own settings. The engine reports to events
    (anything with put(), e.g. a queue shared by a request's sequences) pairs (index, event):
    ("prompt", token_logprobs, tops) once, if score_prompt; ("token", id, logprob, top) per token
    (logprob and top are None unless logprobs is set); ("end", "stop" | "length"), "stop" when the
    token was eos_id; or ("error", message). tops are lists of (id, logprob), most likely first.
    Setting cancelled frees its row at the next step."""
    ids: list                       # the prompt; longer than block_size, it keeps its last block_size
    max_tokens: int
    events: object
    index: int = 0                  # tells its events from those of others sharing `events`
    temperature: float = 0.0        # 0: greedy
    top_k: int = None               # None: no top-k filter
    top_p: float = 1.0
    generator: torch.Generator = None
    eos_id: int = None              # the token that ends it (and is reported); None: only max_tokens does
    logprobs: int = None            # how many top tokens to report with each token's log-probability
    score_prompt: bool = False      # report the prompt's log-probabilities (needs logprobs)
    cancelled: bool = False
    made: int = 0                   # tokens generated so far
    pending: int = None             # the last token, not yet in the KV cache
    window: list = field(default_factory=list)  # the ids in its KV cache row


class QueueFull(Exception):
    pass


class Engine:
    """Continuous batching of Sequences on the rows of cache (a KVCache). submit() queues sequences;
    step(admit()) runs one step; start() runs steps on a thread of its own until stop(), and
    precision() gives the fresh context that thread runs the model in (serve.py: common.autocast's)."""

    def __init__(self, model, cache, max_queue, prefill_tokens, precision=contextlib.nullcontext):
        self.model, self.cache, self.precision = model, cache, precision
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.max_queue, self.prefill_tokens = max_queue, prefill_tokens
        self.running = []  # running[r] is the sequence in row r of the cache
        self.waiting = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False

    def start(self):
        self.thread = threading.Thread(target=self.loop, daemon=True, name="engine")
        self.thread.start()
        return self

    def stop(self):
        """Ends the loop after the step in progress and waits for it: an interpreter that exits while the
        engine thread is inside torch aborts (SIGABRT, 'terminate called without an active exception')."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, sequences):
        with self.wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({len(self.waiting)} sequences waiting, "
                                f"--max_queue={self.max_queue}): retry later")
            self.waiting.extend(sequences)
            self.wake.notify()

    def loop(self):
        while True:
            with self.wake:
                while not self.waiting and not self.running and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                newcomers = self.admit()
            try:
                with torch.no_grad(), self.precision():
                    self.step(newcomers)
            except Exception as e:  # a bug: every sequence in flight gets the error, the engine goes on
                traceback.print_exc()
                for sequence in {id(s): s for s in newcomers + self.running}.values():
                    sequence.events.put((sequence.index, ("error", f"{type(e).__name__}: {e}")))
                self.running = []

    def admit(self):
        """Waiting sequences, first come first served, for the free rows and the prefill budget (one at least)."""
        batch, free = [], len(self.cache.lengths) - len(self.running)
        while self.waiting and len(batch) < free:
            sequence = self.waiting[0]
            longest = max([len(sequence.ids)] + [len(s.ids) for s in batch])
            if batch and (len(batch) + 1) * longest > self.prefill_tokens:
                break
            self.waiting.popleft()
            if not sequence.cancelled:
                batch.append(sequence)
        return batch

    def step(self, newcomers):
        """Running sequences decode one token together; then rows that are full re-read their last
        block_size tokens and newcomers are prefilled, both taking rows at the end."""
        self.leave([s for s in self.running if s.cancelled])
        full = [s for s in self.running if len(s.window) == self.block_size]
        self.leave(full)
        if self.running:  # rows 0..n-1, each with its last token still to be read
            decoding = list(self.running)
            idx = torch.tensor([[s.pending] for s in decoding], device=self.device)
            logits, _ = self.model(idx, kv_cache=self.cache)
            for s in decoding:
                s.window.append(s.pending)
            self.pick_tokens(decoding, logits[:, -1])
        for s in full:
            s.window = (s.window + [s.pending])[-self.block_size:]
        for s in newcomers:
            s.window = s.ids[-self.block_size:]
        for batch in (full, newcomers):
            if batch:
                self.prefill(batch)

    def prefill(self, sequences):
        """Puts sequences in the next free rows, runs their windows in one forward pass, samples each one's
        next token. The padding after a shorter window is never attended to: any id will do."""
        first, lengths = len(self.running), [len(s.window) for s in sequences]
        idx = torch.zeros((len(sequences), max(lengths)), dtype=torch.long, device=self.device)
        for row, s in enumerate(sequences):
            idx[row, :lengths[row]] = torch.tensor(s.window)
        scored = any(s.score_prompt for s in sequences)  # then every position's logits, else each row's last
        logits, _ = self.model(idx, kv_cache=self.cache.rows(first, len(sequences)),
                               lengths=None if scored else torch.tensor(lengths, device=self.device))
        for row, s in enumerate(sequences):
            self.cache.lengths[first + row] = lengths[row]
            if s.score_prompt:
                self.send_prompt_scores(s, logits[row, :lengths[row]])
        self.running.extend(sequences)
        last = logits[torch.arange(len(sequences)), torch.tensor(lengths) - 1] if scored else logits[:, -1]
        self.pick_tokens(sequences, last)

    def send_prompt_scores(self, s, logits):
        scores = logits.float().log_softmax(dim=-1)[:-1]  # row i scores token i + 1
        following = torch.tensor(s.window[1:], device=scores.device)
        picked = scores.gather(1, following[:, None]).squeeze(1).tolist()
        top = scores.topk(s.logprobs, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        s.events.put((s.index, ("prompt", picked, tops)))

    def pick_tokens(self, sequences, logits):
        """Each sequence's next token from its row of logits (B, V); sequences that are done leave, and so
        does one whose sampling fails, with the error: one request's settings never fail the others."""
        done, greedy = [], logits.argmax(dim=-1).tolist()  # one call for the whole batch: most rows are greedy
        for row, (s, best_id) in enumerate(zip(sequences, greedy)):  # rows of logits are read only when needed
            if s.made == s.max_tokens:
                s.events.put((s.index, ("end", "length")))
                done.append(s)
                continue
            try:
                token = best_id
                if s.temperature > 0:
                    token = sample_next(logits[row:row + 1], s.temperature, s.top_k, s.top_p, s.generator).item()
                logprob = top = None
                if s.logprobs is not None:
                    scores = logits[row].float().log_softmax(dim=-1)
                    best = scores.topk(s.logprobs)
                    logprob, top = scores[token].item(), list(zip(best.indices.tolist(), best.values.tolist()))
            except Exception as e:  # a bug, in this sequence alone
                traceback.print_exc()
                s.events.put((s.index, ("error", f"{type(e).__name__}: {e}")))
                done.append(s)
                continue
            s.events.put((s.index, ("token", token, logprob, top)))
            s.made, s.pending = s.made + 1, token
            if token == s.eos_id or s.made == s.max_tokens:
                s.events.put((s.index, ("end", "stop" if token == s.eos_id else "length")))
                done.append(s)
        self.leave(done)

    def leave(self, sequences):
        """Frees the rows of sequences: the last row moves into each freed one, so rows 0..n-1 stay in use."""
        if not sequences:  # most calls, most steps
            return
        leaving = {id(s) for s in sequences}
        rows = sorted((r for r, s in enumerate(self.running) if id(s) in leaving), reverse=True)
        for row in rows:
            last = len(self.running) - 1
            if row != last:
                self.cache.move(row, last)
                self.running[row] = self.running[last]
            self.running.pop()


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                    generator=None):
    """Yields the next token (B, 1) of every row of idx (B, T) at each step: the rows are the sequences
    of an Engine of B rows, run in this thread, the caller's autocast applying. Rows that produced
    eos_id keep emitting it; the stream ends when every row has, or after max_new_tokens steps."""
    device = idx.device
    # the cache holds keys as the model makes them: in autocast's dtype, if it is on
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.lm_head.weight.dtype
    engine = Engine(model, KVCache(model.config, len(idx), dtype, device), max_queue=len(idx),
                    prefill_tokens=idx.numel())
    events = queue.SimpleQueue()
    engine.submit([Sequence(ids, max_new_tokens, events, row, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, eos_id=eos_id) for row, ids in enumerate(idx.tolist())])
    latest = [eos_id] * len(idx)  # a row that has ended repeats eos_id
    while engine.running or engine.waiting:
        engine.step(engine.admit())
        made = False
        while not events.empty():
            row, event = events.get()
            if event[0] == "token":
                latest[row], made = event[1], True
            elif event[0] == "error":
                raise RuntimeError(event[1])
        if made:
            yield torch.tensor(latest, device=device)[:, None]
