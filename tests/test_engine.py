"""engine.py: rows of different lengths in one KV cache decode as each alone (what serve.py's batches
rely on); generate_stream gives the tokens of recomputing every step without a cache; compiled
generation neither breaks its graph nor compiles again for each new prompt length or window refill;
sample_next's filters, and valid draws for any temperature > 0 and top_p in (0, 1];
and the continuous-batching Engine driven step by step on a trained checkpoint."""
import queue

import pytest
import torch

from checkpoint import build_model, load_checkpoint
from conftest import recomputed, shakespeare_text
from engine import Engine, KVCache, QueueFull, Sequence, generate_stream, sample_next
from model import GPT, GPTConfig
from tokenizer import get_encoding


def small():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def test_rows_of_different_lengths_decode_as_each_alone():
    model = small()
    prompts = [torch.randint(0, 257, (n,)) for n in (3, 17, 9)]
    cache = KVCache(model.config, len(prompts), dtype=torch.float32)
    tokens = []
    with torch.no_grad():
        for row, ids in enumerate(prompts):  # each prompt prefilled into its own row
            logits, _ = model(ids[None], kv_cache=cache.rows(row, 1))
            cache.lengths[row] = len(ids)
            tokens.append(logits[0, -1].argmax().item())
        for _ in range(10):  # then all rows step together, each at its own position
            logits, _ = model(torch.tensor(tokens[-len(prompts):])[:, None], kv_cache=cache)
            tokens += logits[:, -1].argmax(-1).tolist()
    batched = torch.tensor(tokens).view(-1, len(prompts)).T
    for ids, row in zip(prompts, batched):
        assert torch.equal(recomputed(model, ids[None], 11, temperature=0)[0, len(ids):], row)


def test_generate_stream_gives_recomputed_tokens_past_the_context_and_after_the_end():
    """The Engine's path (generate_stream, KV cache) and the plain loop without one agree: greedy rows
    past block_size (the window refills), rows that reached eos_id repeating it, and a seeded draw."""
    model = small()
    prompt = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    stream = lambda *args, **kwargs: torch.cat(list(generate_stream(model, *args, **kwargs)), dim=1)
    plain = recomputed(model, prompt, 40, temperature=0)
    assert torch.equal(stream(prompt, 40, temperature=0), plain[:, 20:])
    eos = int(plain[0, 25])
    ended = stream(prompt, 40, temperature=0, eos_id=eos)
    assert torch.equal(ended, recomputed(model, prompt, 40, temperature=0, eos_id=eos)[:, 20:])
    assert (ended[0, 5:] == eos).all()
    drawn = stream(prompt[:1], 40, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, recomputed(model, prompt[:1], 40, temperature=0.8, top_k=50,
                                         generator=torch.Generator().manual_seed(3))[:, 20:])


def test_compiled_generation_has_no_graph_break_and_few_graphs():
    """Prompts of three lengths, each running past block_size (window refills), compiled with
    fullgraph=True (a graph break is an error): one graph for the first prompt length, one for all
    later ones (dynamic), one for decode steps, one for refills."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = small()
    prompts = [torch.randint(0, 257, (1, T), generator=torch.Generator().manual_seed(T)) for T in (5, 9, 13)]
    eager = [torch.cat(list(generate_stream(model, ids, 30, temperature=0)), dim=1) for ids in prompts]
    model.compile(backend="eager", fullgraph=True)  # Dynamo's graphs without inductor's code generation: fast
    compiled = [torch.cat(list(generate_stream(model, ids, 30, temperature=0)), dim=1) for ids in prompts]
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 4 and counters["frames"]["total"] == counters["frames"]["ok"]
    torch._dynamo.reset()


def test_temperature_and_top_p_too_small_for_float32_pick_the_top_token():
    """logits / 1e-40 overflows float32 and 1e-50 is 0 there: either would make no probabilities at all
    (multinomial's 'inf, nan or element < 0'); both are the limit of ever smaller values, the top token."""
    logits = torch.randn(4, 257, generator=torch.Generator().manual_seed(0)) * 20
    greedy = sample_next(logits, temperature=0)
    for temperature, top_k, top_p in ((1e-40, None, None), (1e-300, 5, 0.5), (1.0, None, 1e-50), (1e-40, None, 1e-50)):
        assert torch.equal(sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1)), greedy)


def test_sampling_options():
    torch.manual_seed(0)
    logits = torch.randn(4, 257)
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), greedy)
    draw = lambda: sample_next(logits, 0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draw(), draw())
    allowed = torch.topk(logits, 3).indices
    for seed in range(20):
        pick = sample_next(logits, 2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (pick == allowed).any(1).all()


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    return build_model(checkpoint), get_encoding(checkpoint["meta"]["encoding"])


def model_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, and each position's log-softmax, from the model without a cache."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    scores = logits[0].log_softmax(dim=-1)
    return [scores[i - 1, ids[i]].item() for i in range(1, len(ids))], scores


def engine_of(model, rows=8, max_queue=64, prefill_tokens=2048):
    return Engine(model, KVCache(model.config, rows, dtype=torch.float32), max_queue, prefill_tokens)


def sequence(index, ids, events, max_tokens=20, **settings):
    """A greedy Sequence that ends at <|endoftext|> (256), as serve.py makes them, unless settings say otherwise."""
    return Sequence(ids, max_tokens, events, index, **{"eos_id": 256, **settings})


def drive(engine, steps=10_000):
    """Steps the engine until nothing is waiting or running; the number of steps taken."""
    with torch.no_grad():
        for step in range(steps):
            if not engine.waiting and not engine.running:
                return step
            engine.step(engine.admit())
    raise AssertionError("the engine did not finish")


def events_of(events):
    by_index = {}
    while not events.empty():
        index, event = events.get()
        by_index.setdefault(index, []).append(event)
    return by_index


def test_a_batch_of_different_lengths_decodes_as_each_alone(model):
    """Greedy tokens in one batch (prompts of 1 to 60 tokens, windows re-read past block_size 64) are
    those of each prompt alone without a cache; prompt scores agree within float32 rounding."""
    model, encoding = model
    text = shakespeare_text()
    prompts = [encoding.encode(text[i:i + n]) for i, n in ((0, 1), (500, 7), (900, 30), (1500, 60), (2000, 33))]
    engine, events = engine_of(model), queue.Queue()
    engine.submit([sequence(i, p, events, max_tokens=30, logprobs=1, score_prompt=True) for i, p in enumerate(prompts)])
    drive(engine)
    got = events_of(events)
    for i, ids in enumerate(prompts):
        tokens = [e[1] for e in got[i] if e[0] == "token"]
        alone = recomputed(model, torch.tensor([ids]), len(tokens), temperature=0)[0, len(ids):].tolist()
        assert tokens == alone
        assert tokens[-1] == 256 or len(tokens) == 30
        if len(ids) > 1:
            expected, _ = model_logprobs(model, ids)
            assert got[i][0][1] == pytest.approx(expected, abs=1e-5)
    assert engine.running == []


def test_rows_join_and_leave_at_every_step(model):
    """Newcomers join a running batch and a cancelled sequence frees its row at the next step; the
    queue is first come, first served."""
    model, encoding = model
    engine, events = engine_of(model, rows=2), queue.Queue()
    ids = encoding.encode("ROMEO:")
    first, second, third = (sequence(i, ids, events, max_tokens=40) for i in range(3))
    engine.submit([first, second, third])
    with torch.no_grad():
        engine.step(engine.admit())
        assert engine.running == [first, second] and list(engine.waiting) == [third]
        first.cancelled = True
        engine.step(engine.admit())  # the first leaves; the third waits one more step for its row
        assert engine.running == [second]
        engine.step(engine.admit())
        assert engine.running == [second, third]
    drive(engine)
    got = events_of(events)
    assert [e[0] for e in got[0]] == ["token"]  # one token, from its prefill, then no more and no end
    assert got[1][-1][0] == got[2][-1][0] == "end"


def test_a_full_queue_refuses_and_nothing_grows(model):
    model, _ = model
    engine, events = engine_of(model, rows=1, max_queue=3), queue.Queue()
    engine.submit([sequence(i, [1, 2, 3], events, max_tokens=2) for i in range(3)])
    with pytest.raises(QueueFull):
        engine.submit([sequence(3, [1, 2, 3], events, max_tokens=2)])
    assert drive(engine) >= 3 and engine.cache.k.shape[1] == 1


def test_settings_too_small_for_float32_sample_the_top_token_and_fail_no_one(model):
    """temperature 1e-40 makes logits / temperature overflow float32, top_p 1e-50 is 0 in float32: both
    pick the top token, as greedy does, and the greedy sequence beside them in the batch runs on."""
    model, encoding = model
    engine, events = engine_of(model), queue.Queue()
    ids = encoding.encode("ROMEO:")
    engine.submit([sequence(0, ids, events), sequence(1, ids, events, temperature=1e-40),
                   sequence(2, ids, events, temperature=1.0, top_p=1e-50, generator=torch.Generator().manual_seed(0))])
    drive(engine)
    got = events_of(events)
    tokens = [[e[1] for e in got[i] if e[0] == "token"] for i in range(3)]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) > 0
    assert [got[i][-1][0] for i in range(3)] == ["end"] * 3


def test_a_sequence_whose_sampling_fails_fails_alone(model):
    """A bug in one sequence's sampling (here a generator that is not one) ends that sequence with an
    error; the others in its batch decode on."""
    model, encoding = model
    engine, events = engine_of(model), queue.Queue()
    ids = encoding.encode("ROMEO:")
    engine.submit([sequence(0, ids, events), sequence(1, ids, events, temperature=1.0, generator="not one"),
                   sequence(2, ids, events)])
    drive(engine)
    got = events_of(events)
    assert [e[0] for e in got[1]] == ["error"]
    assert got[0] == got[2] and got[0][-1][0] == "end" and len(got[0]) > 1
    assert engine.running == []


def test_the_prefill_budget_admits_in_order_and_at_least_one(model):
    """A batch of prompts is padded to its longest: rows x longest must fit prefill_tokens, except that
    the first waiting sequence always goes, so a long prompt waits for no one."""
    model, _ = model
    engine, events = engine_of(model, rows=8, prefill_tokens=10), queue.Queue()
    waiting = [sequence(i, [65] * n, events, max_tokens=1) for i, n in enumerate((20, 5, 4, 4, 4, 4))]
    engine.submit(waiting)
    assert engine.admit() == waiting[:1]  # 20 tokens, over the budget alone
    assert engine.admit() == waiting[1:3]  # 2 x 5
    assert engine.admit() == waiting[3:5]  # 2 x 4; a third would make 12
