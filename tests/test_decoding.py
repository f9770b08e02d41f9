"""Decoding contracts of model.py's KVCache: rows of different lengths in one cache decode as each
alone (what serve.py's batches rely on), and compiled generation neither breaks its graph nor compiles
again for each new prompt length or window refill; and sample_next gives valid draws for any
temperature > 0 and top_p in (0, 1]."""
import torch

from model import GPT, GPTConfig, KVCache, sample_next


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
        assert torch.equal(model.generate(ids[None], 11, temperature=0)[0, len(ids):], row)


def test_compiled_generation_has_no_graph_break_and_few_graphs():
    """Prompts of three lengths, each running past block_size (window refills): one graph for the
    first prompt length, one for all later ones (dynamic), one for decode steps, one for refills."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = small()
    eager = [model.generate(torch.randint(0, 257, (1, T), generator=torch.Generator().manual_seed(T)), 30,
                            temperature=0) for T in (5, 9, 13)]
    model.compile(backend="eager")  # Dynamo's graphs without inductor's code generation: fast, same counters
    compiled = [model.generate(torch.randint(0, 257, (1, T), generator=torch.Generator().manual_seed(T)), 30,
                               temperature=0) for T in (5, 9, 13)]
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
