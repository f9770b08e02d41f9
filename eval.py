"""
Held-out perplexity, the paper's metric: one pass over all of val.bin in non-overlapping windows.

    python eval.py --out_dir=out-fixed_min
    python eval.py --out_dir=out-fixed_min --split=test    # test.bin (prepare.py --test_fraction): eval_test.json

Every token of the split but the first is predicted exactly once, from the tokens before it in its
block_size window (the last window may be shorter). Prints loss (nats/token) and perplexity and
writes out_dir/eval.json (eval_test.json for the test split, so that a score used to choose settings
is never mistaken for the reported one) with loss, ppl, tokens, parameter counts and what was
evaluated: only after a whole pass, atomically, so an interrupted or failed evaluation leaves the
previous file as it was. Writing into the run folder, it holds the folder's writer lock (common.
hold_writer) while it runs: a run still being trained there, or another eval.py of it, is refused in
one line naming that process. The split's token file must be the size meta.json records.
"""
import json
import math
import os
import tempfile

import numpy as np
import torch

from checkpoint import build_model, load_checkpoint
from common import (DEVICE_HELP, DTYPE_HELP, EVAL_FILES, THREADS_HELP, UserError, atomic_write, autocast,
                    check_token_files, data_dir, hold_writer, load_meta, progress, releases_writer_locks,
                    resolve_device, resolve_dtype, run_folder, run_main, set_threads)
from configurator import parse_config, split_settings

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder holding ckpt.pt (or a path to a ckpt.pt); eval.json is written in its folder"),
    "dataset": ("", "the dataset to evaluate on ('': the one the checkpoint was trained on)"),
    "batch_size": (8, "windows per forward pass"),
    "split": ("val", "val (val.bin, written to eval.json) or test (test.bin, written to eval_test.json)"),
    "max_val_tokens": (0, "evaluate only the first max_val_tokens of the split (0: all of it)"),
    "device": ("auto", DEVICE_HELP),
    "dtype": ("auto", DTYPE_HELP),
    "threads": (0, THREADS_HELP),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)


@torch.no_grad()
def evaluate(model, tokens, batch_size, device, autocast):
    """(mean loss, number of predicted tokens) over tokens in non-overlapping block_size windows."""
    T = model.config.block_size
    starts = list(range(0, len(tokens) - 1, T))
    short = [starts.pop()] if len(tokens) - 1 - starts[-1] < T else []  # the last window may be shorter
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)] + ([short] if short else [])
    total_loss, total_tokens = 0.0, 0
    for batch in progress(batches, desc="eval", leave=False):
        length = min(T, len(tokens) - 1 - batch[0])
        windows = torch.from_numpy(np.stack([tokens[s:s + length + 1].astype(np.int64) for s in batch])).to(device)
        with autocast:
            _, loss = model(windows[:, :-1], windows[:, 1:])
        total_loss += loss.item() * windows[:, 1:].numel()
        total_tokens += windows[:, 1:].numel()
    return total_loss / total_tokens, total_tokens


@releases_writer_locks
def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    if cfg["batch_size"] < 1:
        raise UserError(f"batch_size must be at least 1, got {cfg['batch_size']}")
    if cfg["split"] not in EVAL_FILES:
        raise UserError(f"split must be val or test, got '{cfg['split']}'")
    if cfg["max_val_tokens"] < 0:
        raise UserError(f"max_val_tokens must be 0 (all of val.bin) or more, got {cfg['max_val_tokens']}")
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    checkpoint = load_checkpoint(cfg["out_dir"])
    model = build_model(checkpoint, device)
    set_threads(cfg["threads"], device, model, cfg["batch_size"] * model.config.block_size)
    dataset = cfg["dataset"] or checkpoint["config"].get("dataset", "")
    meta, trained_on = load_meta(dataset), checkpoint["meta"]
    if (meta["encoding"], meta["vocab_size"]) != (trained_on["encoding"], trained_on["vocab_size"]):
        raise UserError(f"dataset '{dataset}' uses {meta['encoding']} (V={meta['vocab_size']}) but the model was "
                        f"trained on {trained_on['encoding']} (V={trained_on['vocab_size']}): evaluate on data of "
                        f"the same encoding")
    run_dir = run_folder(cfg["out_dir"])
    try:  # before the pass, not after it: a folder that cannot take eval.json fails now
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as e:
        raise UserError(f"cannot write {EVAL_FILES[cfg['split']]} into '{run_dir}' ({e.strerror})") from None

    path = os.path.join(data_dir(dataset), f"{cfg['split']}.bin")
    if not os.path.isfile(path):
        raise UserError(f"dataset '{dataset}' has no {cfg['split']} split ({path} is missing): prepare it with "
                        f"prepare.py --test_fraction=0.1, or evaluate on --split=val")
    check_token_files(dataset, meta, (cfg["split"],))  # a file cut short or replaced since prepare.py
    hold_writer(run_dir, f"run folder '{run_dir}'", "; then evaluate it")  # let go when main ends (run_main)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if cfg["max_val_tokens"]:
        tokens = tokens[:cfg["max_val_tokens"]]
    if len(tokens) < 2:
        raise UserError(f"{cfg['split']}.bin of '{dataset}' holds {len(tokens)} token(s): nothing to evaluate")
    loss, n = evaluate(model, tokens, cfg["batch_size"], device, autocast(device, dtype))
    if not math.isfinite(loss):
        raise UserError(f"the held-out loss is {loss}: the model's outputs are not finite; "
                        f"{EVAL_FILES[cfg['split']]} is unchanged")
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": n, "split": cfg["split"], "dataset": dataset,
              "encoding": meta["encoding"], "params": model.param_counts(),
              "input_code": model.config.input_code, "iter_num": checkpoint.get("iter_num"),
              "tokens_seen": checkpoint.get("tokens_seen"), "block_size": model.config.block_size}
    atomic_write(os.path.join(run_dir, EVAL_FILES[cfg["split"]]),
                 lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"{model.config.input_code}: {cfg['split']} loss {loss:.4f}, perplexity {math.exp(loss):.3f} "
          f"over {n:,} tokens of {dataset}")


if __name__ == "__main__":
    run_main(main)
