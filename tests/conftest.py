"""Shared fixtures: small real checkpoints, trained here on Shakespeare bytes, for every input code."""
import os

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from model import GPT, GPTConfig

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")
TINY_MODEL = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)


def shakespeare_text():
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} is missing: the tests expect ../shared beside the checkout")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


def _train_tiny(out_dir, input_code, steps=40):
    tokens = np.frombuffer(shakespeare_text()[:200_000].encode("utf-8"), dtype=np.uint8).astype(np.int64)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, input_code=input_code, **TINY_MODEL)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - config.block_size - 1, size=8)
        batch = torch.from_numpy(np.stack([tokens[s:s + config.block_size + 1] for s in starts]))
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {"encoding": "bytes", "vocab_size": 257, "eot_token": 256, "source": SHAKESPEARE}
    save_checkpoint({"model_args": vars(config), "model": model.state_dict(), "meta": meta, "config": {},
                     "iter_num": steps, "tokens_seen": steps * 8 * config.block_size,
                     "best_val_loss": loss.item(), "val_loss": loss.item()}, str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """trained_checkpoint(input_code) -> an out_dir holding ckpt.pt of a tiny model trained on bytes."""
    made = {}

    def make(input_code="fixed_min"):
        if input_code not in made:
            made[input_code] = _train_tiny(tmp_path_factory.mktemp(f"run_{input_code}"), input_code)
        return made[input_code]

    return make
