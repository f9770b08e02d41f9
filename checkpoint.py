"""
Checkpoints: written atomically, read back memory-mapped with torch.load(weights_only=True), checked,
turned into a model. Every check of what is loaded lives here: the file's digest, finite weights, the
model settings (model_config, the one way from settings to a GPTConfig) and the input code's stored
buffers (check_input_code).

A checkpoint is out_dir/ckpt.pt, a dict of plain types and tensors:
  model_args     GPTConfig fields            model          state_dict (the code buffers A/b included)
  meta           the dataset's meta.json     config         train.py's settings (a TrainConfig as a dict)
  iter_num       optimizer steps done        tokens_seen    tokens trained on
  best_val_loss, val_loss                    optimizer      AdamW state; scaler: float16's loss scale
  sha256         a digest of everything else, verified on every load: a changed file is refused

Loading maps the file into memory: every process of a host that loads it shares the page cache's
one copy (8 ranks resuming on one host hold one copy, not 8); the mapping stays valid as long as a
tensor lives, because a checkpoint is only ever replaced by a rename, never rewritten in place.
"""
import hashlib
import os
import re
from dataclasses import fields

import torch

from common import UserError, atomic_write, closest
from model import CODES, GPT, BinaryCode, GPTConfig
from tokenizer import get_encoding

CKPT_NAME = "ckpt.pt"


class CheckpointError(UserError):
    pass


def digest(value, h=None):
    """sha256 of a checkpoint's contents: tensors by dtype, shape and bytes, containers in key order."""
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=repr):
            digest(key, h)
            digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            digest(item, h)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())
    return h


def save_checkpoint(checkpoint, out_dir):
    checkpoint = {**checkpoint, "sha256": digest(checkpoint).hexdigest()}
    atomic_write(os.path.join(out_dir, CKPT_NAME), lambda f: torch.save(checkpoint, f))


def load_checkpoint(out_dir, device="cpu"):
    """The checkpoint dict of out_dir (or of a ckpt.pt path); CheckpointError with a one-line reason."""
    path = out_dir if os.path.isfile(out_dir) else os.path.join(out_dir, CKPT_NAME)
    if not os.path.isdir(out_dir) and not os.path.isfile(out_dir):
        raise CheckpointError(f"out_dir '{out_dir}' does not exist: train a model there first (python train.py ...)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint in '{out_dir}' (expected {CKPT_NAME}): train a model there first")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # torch's own message suggests weights_only=False: wrong advice for a broken file
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch "
                              f"checkpoint ({type(e).__name__})") from None
    missing = [key for key in ("model_args", "model", "meta")
               if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repository (missing {', '.join(missing)})")
    expected = checkpoint.pop("sha256", None)  # checkpoints written before checksums have none
    if expected is not None and digest(checkpoint).hexdigest() != expected:
        raise CheckpointError(f"{path} is corrupted: its contents do not match the checksum written with it "
                              f"(a damaged disk or an incomplete copy); use another copy or train again")
    broken = [name for name, t in checkpoint["model"].items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise CheckpointError(f"{path} holds non-finite weights ({', '.join(broken[:3])}): it cannot be used")
    return checkpoint


def model_config(settings, **overrides):
    """The GPTConfig of settings (a training config or a checkpoint's model_args) with overrides; a
    UserError naming what is wrong, and the nearest code to a misspelt input_code."""
    values = {**{f.name: settings[f.name] for f in fields(GPTConfig) if f.name in settings}, **overrides}
    try:
        return GPTConfig(**values)
    except (ValueError, TypeError) as e:
        code = values.get("input_code", "")
        hint = closest(code, CODES) if isinstance(code, str) and code not in CODES else ""
        raise UserError(f"{e}{hint}") from None


def checkpoint_config(checkpoint):
    """The GPTConfig a checkpoint was trained with; fields newer than the checkpoint take their defaults."""
    unknown = sorted(set(checkpoint["model_args"]) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"checkpoint has model settings this code does not know ({', '.join(unknown)}): "
                              f"it was written by a newer version of this repository")
    try:
        return model_config(checkpoint["model_args"])
    except UserError as e:  # e.g. an input code registered by the process that trained it, not this one
        raise CheckpointError(f"checkpoint's model settings are refused: {e}") from None


def check_input_code(model):
    """Refuse a binary code whose stored buffers (affine's A and b, permuted's perm, random_wide's
    codebook, a code of yours) do not give every id its own code: a damaged or hand-edited checkpoint."""
    embed = model.embed
    if not isinstance(embed, BinaryCode):
        return
    ids = torch.arange(model.config.vocab_size, device=model.lm_head.weight.device)
    stored = ", ".join(f"embed.{name}" for name in embed.state_dict()) or "none"
    code = f"checkpoint's input code {model.config.input_code!r} (stored: {stored})"
    if type(embed).bits is BinaryCode.bits:
        recoded = embed.recode(ids)
        if not bool(((recoded >= 0) & (recoded < 2 ** embed.K)).all()) or len(recoded.unique()) != len(ids):
            raise CheckpointError(f"{code} does not map the {len(ids)} ids to distinct {embed.K}-bit ids: it is "
                                  f"damaged")
        return
    bits = embed.bits(ids)
    if not bool(((bits == 0) | (bits == 1)).all()):
        raise CheckpointError(f"{code} holds values other than 0 and 1: it is damaged")
    if len(bits.unique(dim=0)) != len(ids):
        raise CheckpointError(f"{code} gives two ids the same code: it is damaged")


def load_weights(model, checkpoint):
    """The checkpoint's weights and buffers into model (train.py's resume, build_model), then its input code
    checked. The key prefixes that torch.compile (_orig_mod.) and DDP (module.) wrappers add are dropped."""
    state = {re.sub(r"^((_orig_mod|module)\.)+", "", key): value for key, value in checkpoint["model"].items()}
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights do not fit its model: {' '.join(str(e).split())}") from None
    check_input_code(model)


def build_model(checkpoint, device="cpu"):
    """The GPT of a checkpoint with its weights, on device, in eval mode."""
    model = GPT(checkpoint_config(checkpoint))
    load_weights(model, checkpoint)
    return model.to(device).eval()


def load_for_inference(out_dir, device):
    """(checkpoint, model in eval mode on device, tokenizer); UserError with a one-line reason."""
    checkpoint = load_checkpoint(out_dir)  # onto the CPU first: a GPU-trained checkpoint loads anywhere
    try:
        model = build_model(checkpoint, device)
        encoding = get_encoding(checkpoint["meta"].get("encoding", "?"))
    except (ValueError, TypeError) as e:  # GPTConfig or tokenizer refusing what the checkpoint names
        raise UserError(f"cannot use the checkpoint in '{out_dir}': {e}") from None
    if encoding.n_vocab != model.config.vocab_size:
        raise UserError(f"checkpoint's tokenizer '{encoding.name}' has {encoding.n_vocab} tokens but its model "
                        f"has vocab_size {model.config.vocab_size}")
    return checkpoint, model, encoding
