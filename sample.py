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
batch 1) go to stderr. Generation uses the model's KV cache (GPT.generate_stream), so each new token
costs one forward pass of one position.
"""
import codecs
import os
import sys
import time
from contextlib import nullcontext

import torch

from checkpoint import CheckpointError, build_model, load_checkpoint
from configurator import ConfigError, parse_config
from tokenizer import ENDOFTEXT, get_encoding

DEFAULTS = dict(
    out_dir="out",          # the run folder holding ckpt.pt (or a path to a ckpt.pt)
    start="",               # the prompt: text, or FILE:path to read it from a file; "" = a new document
    num_samples=1,
    max_new_tokens=200,
    temperature=0.8,        # 0 = greedy
    top_k=200,              # None or 0: no top-k filter
    top_p=1.0,              # 1.0: no nucleus filter
    seed=1337,              # None: a different draw every run
    device="auto",          # 'auto' = cuda when available, else cpu; or 'cpu', 'cuda', 'cuda:1', ...
    dtype="auto",           # 'auto' = bfloat16 (float16 where unsupported) on CUDA, float32 on CPU
    compile=False,          # torch.compile the model: a few graphs (prompt, step) to compile first, so only
                            # long generations gain
    stop_at_eot=True,       # end a sample at <|endoftext|>
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
SEPARATOR = "---------------"


def resolve_device(name):
    """'auto' -> 'cuda' or 'cpu'; ConfigError for a device torch does not know or this machine lacks."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but CUDA is not available here: use --device=cpu")
    return name


def resolve_dtype(name, device):
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got '{name}'")
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast(device, dtype):
    """A fresh context to run the model in: as is for float32, else autocast to dtype (fresh, because
    an autocast object keeps state while entered and the server enters them from several threads)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def load_for_inference(out_dir, device):
    """(checkpoint, model in eval mode on device, tokenizer); CheckpointError with a one-line reason."""
    checkpoint = load_checkpoint(out_dir)  # onto the CPU first: a GPU-trained checkpoint loads anywhere
    try:
        model = build_model(checkpoint, device)
        encoding = get_encoding(checkpoint["meta"].get("encoding", "?"))
    except (ValueError, TypeError) as e:  # GPTConfig or tokenizer refusing what the checkpoint names
        raise CheckpointError(f"cannot use the checkpoint in '{out_dir}': {e}") from None
    if encoding.n_vocab != model.config.vocab_size:
        raise CheckpointError(f"checkpoint's tokenizer '{encoding.name}' has {encoding.n_vocab} tokens but its model "
                              f"has vocab_size {model.config.vocab_size}")
    return checkpoint, model, encoding


def encode_prompt(encoding, text):
    """Token ids of text, reading the literal <|endoftext|> as the document boundary; [eot] for ''."""
    return encoding.encode(text, allowed_special={ENDOFTEXT}) or [encoding.eot_token]


def read_start(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the prompt file '{path}' given by --start=FILE:...: {e}") from None


def check_settings(config):
    checks = [
        (config["num_samples"] >= 1, "num_samples must be at least 1"),
        (config["max_new_tokens"] >= 0, "max_new_tokens must be 0 or more"),
        (config["temperature"] >= 0, "temperature must be 0 (greedy) or more"),
        (config["top_k"] is None or config["top_k"] >= 0, "top_k must be None, 0 (both: off) or a positive count"),
        (0 < config["top_p"] <= 1, "top_p must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def new_tokens(model, ids, config, eot, generator, arrivals):
    """The ids of one sample's new tokens, one at a time (ending before eot if asked); appends each
    token's arrival time to arrivals, for the decode speed."""
    stream = model.generate_stream(torch.tensor([ids], device=model.rope_cos.device), config["max_new_tokens"],
                                   config["temperature"], config["top_k"] or None, config["top_p"],
                                   eos_id=eot if config["stop_at_eot"] else None, generator=generator)
    for token in stream:
        arrivals.append(time.perf_counter())
        token = token.item()
        if token == eot and config["stop_at_eot"]:
            return
        yield token


def write_text(encoding, tokens, write):
    """write() the text of tokens as they come, each character once all its bytes have arrived (a
    character can span tokens: a byte token or a BPE token may hold part of one). Returns the count."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    count = 0
    for token in tokens:
        write(decoder.decode(encoding.decode_single_token_bytes(token)))
        count += 1
    write(decoder.decode(b"", final=True))  # bytes still pending form no character: U+FFFD
    return count


def write_stdout(text):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def log(message):
    print(message, file=sys.stderr, flush=True)


def main(argv):
    config = parse_config(DEFAULTS, argv)
    check_settings(config)
    start = read_start(config["start"])
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)

    checkpoint, model, encoding = load_for_inference(config["out_dir"], device)
    block_size = model.config.block_size
    val_loss = checkpoint.get("val_loss")
    log(f"checkpoint {os.path.abspath(config['out_dir'])}: step {checkpoint.get('iter_num', '?')}, "
        f"val loss {f'{val_loss:.4f}' if isinstance(val_loss, float) else '?'}, input_code {model.config.input_code}, "
        f"{model.param_counts()['trainable'] / 1e6:.2f}M trainable parameters, encoding {encoding.name}, "
        f"{device} {dtype}")
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
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"sample.py: error: {e}")
