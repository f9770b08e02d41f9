"""
Generate text from a trained checkpoint, as in nanoGPT:

    python sample.py --out_dir=out-fixed_min --start="ROMEO:" --max_new_tokens=200
    python sample.py --out_dir=out-fixed_min --start=FILE:prompt.txt --temperature=0

Flags are --key=value (or config files of assignments) over DEFAULTS below; --help lists them.
temperature=0 is greedy; top_k=None (or 0) and top_p=1.0 switch those filters off.

The prompt is encoded with the checkpoint's own tokenizer. The literal text <|endoftext|> in a prompt
is the end-of-text token (a document boundary), and an empty prompt starts from that token alone:
"the start of a document", as nanoGPT's default '\\n' is "the start of a line".

stdout gets the samples only: the prompt, then its continuation as it is generated (decoded as bytes
arrive, so a character split across tokens is printed once it is complete), one sample after another
separated by a line of dashes. Diagnostics (the checkpoint's step and val loss, decode tokens/s at
batch 1) go to stderr. Generation is engine.py's generate_stream: the Engine serve.py runs, with a KV
cache, so each new token costs one forward pass of one position, and a greedy sample is what serve.py
answers for the same prompt.
"""
import os
import sys
import time

import torch

from checkpoint import load_for_inference
from common import (DEVICE_HELP, DTYPE_HELP, THREADS_HELP, TORCH_SEEDS, UserError, autocast, device_text,
                    resolve_device, resolve_dtype, run_main, set_threads)
from configurator import parse_config, split_settings
from engine import generate_stream
from tokenizer import TextStream, encode_prompt

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder holding ckpt.pt (or a path to a ckpt.pt)"),
    "start": ("", "the prompt: text, or FILE:path to read it from a file; '' starts a new document"),
    "num_samples": (1, "samples to draw, one after another"),
    "max_new_tokens": (200, "tokens to generate per sample (at most; fewer if <|endoftext|> ends it)"),
    "temperature": (0.8, "0 is greedy; higher is more random"),
    "top_k": (200, "sample among the top_k most likely tokens; None or 0: no top-k filter"),
    "top_p": (1.0, "nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0: off"),
    "seed": (1337, "seeds the sampling; None: a different draw every run"),
    "device": ("auto", DEVICE_HELP),
    "dtype": ("auto", DTYPE_HELP),
    "threads": (0, THREADS_HELP),
    "compile": (False, "torch.compile the model: a few graphs (prompt, step) compile first, so only long "
                       "generations gain"),
    "stop_at_eot": (True, "end a sample at <|endoftext|>"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
SEPARATOR = "---------------"


def read_start(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompt file '{path}' given by --start=FILE:...: {e}") from None


def check_settings(config):
    checks = [
        (config["num_samples"] >= 1, "num_samples must be at least 1"),
        (config["max_new_tokens"] >= 0, "max_new_tokens must be 0 or more"),
        (config["temperature"] >= 0, "temperature must be 0 (greedy) or more"),
        (config["top_k"] is None or config["top_k"] >= 0, "top_k must be None, 0 (both: off) or a positive count"),
        (0 < config["top_p"] <= 1, "top_p must be in (0, 1]"),
        (config["seed"] is None or TORCH_SEEDS[0] <= config["seed"] <= TORCH_SEEDS[1],
         f"seed must be None or an integer from {TORCH_SEEDS[0]} to {TORCH_SEEDS[1]}, got {config['seed']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def new_tokens(model, ids, config, eot, generator, arrivals):
    """The ids of one sample's new tokens, one at a time (ending before eot if asked); appends each
    token's arrival time to arrivals, for the decode speed."""
    stream = generate_stream(model, torch.tensor([ids], device=model.rope_cos.device), config["max_new_tokens"],
                             config["temperature"], config["top_k"] or None, config["top_p"],
                             eos_id=eot if config["stop_at_eot"] else None, generator=generator)
    for token in stream:
        arrivals.append(time.perf_counter())
        token = token.item()
        if token == eot and config["stop_at_eot"]:
            return
        yield token


def write_text(encoding, tokens, write):
    """write() the text of tokens as they come, each character once all its bytes have arrived.
    Returns the count."""
    text, count = TextStream(encoding), 0
    for token in tokens:
        write(text.add(token))
        count += 1
    write(text.finish())
    return count


def write_stdout(text):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def log(message):
    print(message, file=sys.stderr, flush=True)


def main(argv):
    config = parse_config(DEFAULTS, argv, MEANINGS, __doc__, nullable=("top_k", "seed"))
    check_settings(config)
    start = read_start(config["start"])
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)

    checkpoint, model, encoding = load_for_inference(config["out_dir"], device)
    block_size = model.config.block_size
    set_threads(config["threads"], device, model, block_size)  # its largest call: a prompt of block_size tokens
    val_loss = checkpoint.get("val_loss")
    log(f"checkpoint {os.path.abspath(config['out_dir'])}: step {checkpoint.get('iter_num', '?')}, "
        f"val loss {f'{val_loss:.4f}' if isinstance(val_loss, float) else '?'}, input_code {model.config.input_code}, "
        f"{model.param_counts()['trainable'] / 1e6:.2f}M trainable parameters, encoding {encoding.name}, "
        f"{device_text(device)} {str(dtype).removeprefix('torch.')}")
    if config["compile"]:
        model.compile()  # in place, so generate_stream's calls to the model go through the compiled forward

    ids = encode_prompt(encoding, start)
    if len(ids) > block_size:
        log(f"warning: the prompt is {len(ids)} tokens, longer than the model's context (block_size "
            f"{block_size}): generating from its last {block_size} tokens")
        ids = ids[-block_size:]

    generator = None
    if config["seed"] is not None:
        torch.manual_seed(config["seed"])
        generator = torch.Generator(device=device).manual_seed(config["seed"])
    for i in range(config["num_samples"]):
        if i > 0:
            write_stdout(SEPARATOR + "\n")
        write_stdout(start)
        arrivals = []
        with autocast(device, dtype):
            count = write_text(encoding, new_tokens(model, ids, config, encoding.eot_token, generator, arrivals),
                               write_stdout)
        write_stdout("\n")
        speed = ""
        if len(arrivals) > 1:  # the first token also paid for the prompt; the rest are pure decode steps
            speed = f", {(len(arrivals) - 1) / (arrivals[-1] - arrivals[0]):.1f} tokens/s decode at batch 1"
        log(f"sample {i + 1}: {len(ids)} prompt tokens, {count} new tokens{speed}")


if __name__ == "__main__":
    run_main(main)
