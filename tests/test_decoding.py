"""Decoding contracts of model.py's KVCache: rows of different lengths in one cache decode as each
alone (what serve.py's batches rely on), and compiled generation neither breaks its graph nor compiles
again for each new prompt length or window refill."""
import torch

from model import GPT, GPTConfig, KVCache


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
