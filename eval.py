"""
Held-out perplexity, the paper's metric: one pass over all of val.bin in non-overlapping windows.

    python eval.py --out_dir=out-fixed_min

Every token of val.bin but the first is predicted exactly once, from the tokens before it in its
block_size window (the last window may be shorter). Prints loss (nats/token) and perplexity and
writes out_dir/eval.json with loss, ppl, tokens and what was evaluated.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write, build_model, load_checkpoint
from configurator import ConfigError, parse_config
from common import autocast, resolve_device, resolve_dtype
from train import data_dir

DEFAULTS = dict(
    out_dir="out",
    dataset="",      # default: the dataset the checkpoint was trained on
    batch_size=8,    # windows per forward pass
    max_tokens=0,    # evaluate only the first max_tokens of val.bin (0: all of it)
    device="auto", dtype="auto",
)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


@torch.no_grad()
def evaluate(model, tokens, batch_size, device, autocast):
    """(mean loss, number of predicted tokens) over tokens in non-overlapping block_size windows."""
    T = model.config.block_size
    starts = list(range(0, len(tokens) - 1, T))
    short = [starts.pop()] if len(tokens) - 1 - starts[-1] < T else []  # the last window may be shorter
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)] + ([short] if short else [])
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(batches, desc="eval", file=sys.stderr, leave=False):
        length = min(T, len(tokens) - 1 - batch[0])
        windows = torch.from_numpy(np.stack([tokens[s:s + length + 1].astype(np.int64) for s in batch])).to(device)
        with autocast:
            _, loss = model(windows[:, :-1], windows[:, 1:])
        total_loss += loss.item() * windows[:, 1:].numel()
        total_tokens += windows[:, 1:].numel()
    return total_loss / total_tokens, total_tokens


def main(argv):
    try:
        cfg = parse_config(DEFAULTS, argv)
        checkpoint = load_checkpoint(cfg["out_dir"])
        model = build_model(checkpoint)
        device = resolve_device(cfg["device"])
        dtype = resolve_dtype(cfg["dtype"], device)
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    dataset = cfg["dataset"] or checkpoint["config"].get("dataset", "")
    folder = data_dir(dataset)
    meta_path = os.path.join(folder, "meta.json")
    if not dataset or not os.path.isfile(meta_path):
        fail(f"dataset '{dataset}' not found ({meta_path} is missing): pass --dataset=NAME or run prepare.py")
    with open(meta_path) as f:
        meta = json.load(f)
    trained_on = checkpoint["meta"]
    if (meta["encoding"], meta["vocab_size"]) != (trained_on["encoding"], trained_on["vocab_size"]):
        fail(f"dataset '{dataset}' uses {meta['encoding']} (V={meta['vocab_size']}) but the model was trained on "
             f"{trained_on['encoding']} (V={trained_on['vocab_size']}): evaluate on data of the same encoding")

    model.to(device)

    tokens = np.memmap(os.path.join(folder, "val.bin"), dtype=np.uint16, mode="r")
    if cfg["max_tokens"]:
        tokens = tokens[:cfg["max_tokens"]]
    if len(tokens) < 2:
        fail(f"val.bin of '{dataset}' holds {len(tokens)} token(s): nothing to evaluate")
    loss, n = evaluate(model, tokens, cfg["batch_size"], device, autocast(device, dtype))
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": n, "dataset": dataset, "encoding": meta["encoding"],
              "input_code": model.config.input_code, "iter_num": checkpoint.get("iter_num"),
              "tokens_seen": checkpoint.get("tokens_seen"), "block_size": model.config.block_size}
    atomic_write(os.path.join(cfg["out_dir"], "eval.json"), lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"{model.config.input_code}: val loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {n:,} tokens "
          f"of {dataset}")


if __name__ == "__main__":
    main(sys.argv[1:])
