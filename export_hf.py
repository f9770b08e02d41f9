"""
Export a checkpoint as a Hugging Face model folder that transformers loads with trust_remote_code.

    python export_hf.py --out_dir=out-fixed_min --hf_dir=hf-fixed_min

    from transformers import AutoTokenizer, AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained("hf-fixed_min", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained("hf-fixed_min", trust_remote_code=True)

The folder (written beside its final place, then renamed into it) holds:
  config.json, generation_config.json  the GPTConfig fields, auto_map, <|endoftext|> ids; greedy by default
  model.safetensors                    the checkpoint's state_dict under 'gpt.' (code buffers keep their dtype)
  model.py                             this repository's model.py, copied verbatim: the model itself (an input
                                       code registered from outside model.py is appended to it, see code_source)
  modeling_fixed_code_gpt.py           transformers classes around model.GPT  (from hf_remote_code/)
  tokenization_fixed_code_gpt.py       a tokenizer over tiktoken              (from hf_remote_code/)
  tokenizer.tiktoken, tokenizer_config.json   the encoding's merge ranks and split pattern
An existing --hf_dir is replaced only when it is an earlier export with nothing added. transformers and
safetensors are optional extras, needed only here and to load the folder.
"""
import base64
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import textwrap
import types
from dataclasses import asdict

import torch

import model as model_py
from checkpoint import build_model, load_checkpoint
from common import UserError, run_folder, run_main
from configurator import parse_config, split_settings
from tokenizer import ENDOFTEXT, get_encoding

SETTINGS = {  # key: (default, meaning)
    "out_dir": ("out", "the run folder holding ckpt.pt (or a path to a ckpt.pt)"),
    "hf_dir": ("", "the folder to write ('': hf in the run folder); an earlier export there is replaced"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ["modeling_fixed_code_gpt.py", "tokenization_fixed_code_gpt.py"]  # in hf_remote_code/
FOLDER_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.py", "tokenizer.tiktoken",
                "tokenizer_config.json", *REMOTE_CODE}
MODEL_TYPE = "fixed_code_gpt"


def require_extras():
    """safetensors.torch; transformers must be installed too, to load what we write."""
    missing = [name for name in ("transformers", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"export_hf.py needs {' and '.join(missing)}: pip install transformers safetensors")
    import safetensors.torch
    return safetensors.torch


def exportable_encoding(name, vocab_size):
    """The checkpoint's tiktoken Encoding, if the exported tokenizer can hold it: merge ranks 0..V-2
    and <|endoftext|> = V-1, nothing else (true of 'cl100k_65536', 'bytes' and 'gpt2')."""
    try:
        enc = get_encoding(name)
    except ValueError as e:
        raise UserError(f"the checkpoint's tokenizer cannot be exported: {e}") from None
    if enc.special_tokens_set != {ENDOFTEXT} or enc.eot_token != enc.n_vocab - 1:
        raise UserError(f"encoding '{name}' is not merge ranks followed by {ENDOFTEXT} alone, which is all "
                              f"the exported tokenizer holds ('cl100k_65536' and 'bytes' are)")
    if enc.n_vocab != vocab_size:
        raise UserError(f"encoding '{name}' has {enc.n_vocab:,} tokens but the model's vocab_size is {vocab_size:,}")
    return enc


def run_source(source):
    """model.py's source run as a module of its own, as the exported folder will run it."""
    module = types.ModuleType("exported_model")
    exec(compile(source, "model.py", "exec"), module.__dict__)
    return module


def code_source(name, source):
    """What source (model.py) must gain to hold input code `name`: nothing when its own CODES has it; for
    a code registered from elsewhere, the source of its class (and of its bases from the same module),
    if model.py does not define it, and its CODES entry. Such a class may use only what model.py
    defines or imports."""
    cls = model_py.CODES[name]
    ours = cls.__module__ == model_py.__name__
    if ours and getattr(run_source(source).CODES.get(name), "__qualname__", None) == cls.__qualname__:
        return ""
    classes = [] if ours else [c for c in reversed(cls.__mro__) if c.__module__ == cls.__module__]
    try:
        sources = [textwrap.dedent(inspect.getsource(c)) + "\n\n" for c in classes]
        where = os.path.basename(inspect.getsourcefile(cls))
    except (OSError, TypeError):
        raise UserError(f"input code '{name}' ({cls.__module__}.{cls.__qualname__}) is not in model.py and "
                              f"its source cannot be read: define its class in a file, or in model.py") from None
    return (f"\n\n# Appended by export_hf.py: input code '{name}', registered from {cls.__module__} ({where}), "
            f"not in the repository's model.py.\n\n" + "".join(sources) + f"CODES[{name!r}] = {cls.__name__}\n")


def check_model_source(source, model):
    """The exported model.py, run on its own, must rebuild model number for number: an appended code
    class that leans on a name of its own module fails here, not in the user's from_pretrained."""
    try:
        exported = run_source(source)
        copy = exported.GPT(exported.GPTConfig(**asdict(model.config)))
        copy.load_state_dict(model.state_dict())
        ids = torch.arange(min(model.config.block_size, model.config.vocab_size))[None]
        with torch.no_grad():
            same = torch.equal(copy.eval()(ids)[0], model(ids)[0])
    except Exception as e:
        raise UserError(f"input code '{model.config.input_code}' does not run from the exported model.py "
                              f"({type(e).__name__}: {e}): its class may use only names model.py defines or "
                              f"imports") from None
    if not same:
        raise UserError(f"input code '{model.config.input_code}' gives other logits from the exported "
                              f"model.py than here")


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def write_folder(folder, checkpoint, model, enc, save_safetensors):
    config = model.config
    eot = enc.eot_token
    state = {f"gpt.{key}": value.contiguous() for key, value in model.state_dict().items()}
    save_safetensors(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(HERE, "model.py"), encoding="utf-8", newline="") as f:
        source = f.read()
    appended = code_source(config.input_code, source)
    if appended:
        source += appended
        check_model_source(source, model)
    with open(os.path.join(folder, "model.py"), "w", encoding="utf-8", newline="") as f:
        f.write(source)
    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(HERE, "hf_remote_code", name), os.path.join(folder, name))
    with open(os.path.join(folder, "tokenizer.tiktoken"), "wb") as f:  # tiktoken's format: base64 token, rank
        f.writelines(base64.b64encode(enc.decode_single_token_bytes(i)) + f" {i}\n".encode() for i in range(eot))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "FixedCodeTiktokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_fixed_code_gpt.FixedCodeTiktokenTokenizer", None]},
        "pat_str": enc._pat_str,  # tiktoken's split regex (what Encoding pickles as pat_str)
        "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
        "model_max_length": config.block_size,
        "clean_up_tokenization_spaces": False,
    })
    dtype = model.lm_head.weight.dtype
    write_json(os.path.join(folder, "config.json"), {
        "architectures": ["FixedCodeGPTForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "modeling_fixed_code_gpt.FixedCodeGPTConfig",
                     "AutoModelForCausalLM": "modeling_fixed_code_gpt.FixedCodeGPTForCausalLM"},
        **asdict(config),
        "max_position_embeddings": config.block_size,  # the context length, where transformers and lm-eval look
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "encoding": enc.name,
        "iter_num": checkpoint.get("iter_num"), "tokens_seen": checkpoint.get("tokens_seen"),
    })
    write_json(os.path.join(folder, "generation_config.json"), {
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False, "use_cache": False,
    })


def replaceable(folder):
    """An empty folder, or an earlier export holding nothing but what export writes."""
    if not os.path.isdir(folder) or not set(os.listdir(folder)) <= FOLDER_FILES:
        return False
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except FileNotFoundError:
        return not os.listdir(folder)
    except (OSError, ValueError, AttributeError):
        return False


def export(out_dir, hf_dir):
    """Write the Hugging Face folder of out_dir's checkpoint to hf_dir; UserError when it cannot,
    ModuleNotFoundError without the extras."""
    save_safetensors = require_extras().save_file
    hf_dir = os.path.abspath(hf_dir)
    if os.path.exists(hf_dir) and not replaceable(hf_dir):
        raise UserError(f"'{hf_dir}' exists and is not an earlier export (or holds files of yours): pick "
                              f"another --hf_dir or remove it")
    checkpoint = load_checkpoint(out_dir)
    model = build_model(checkpoint)
    enc = exportable_encoding(checkpoint["meta"].get("encoding", ""), model.config.vocab_size)
    parent = os.path.dirname(hf_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(hf_dir)}.tmp.", dir=parent)
    except OSError as e:  # a file where a folder must be, a folder we may not write, a pseudo file system (/proc)
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
        reason = "a file is in the way of" if in_the_way else f"{e.strerror} in"
        raise UserError(f"cannot create --hf_dir '{hf_dir}': {reason} '{parent}': pick another --hf_dir") from None
    try:
        write_folder(staging, checkpoint, model, enc, save_safetensors)
        for name in os.listdir(staging):  # mkdtemp (and safetensors) make them private to us
            os.chmod(os.path.join(staging, name), 0o644)
        os.chmod(staging, 0o755)
        if os.path.exists(hf_dir):  # move the old export aside, never delete it before the new one is in place
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(hf_dir)}.old.", dir=parent)
            os.replace(hf_dir, old)
            os.replace(staging, hf_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, hf_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, enc


def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    hf_dir = cfg["hf_dir"] or os.path.join(run_folder(cfg["out_dir"]), "hf")
    try:
        model, enc = export(cfg["out_dir"], hf_dir)
    except (ValueError, ModuleNotFoundError) as e:  # what export() refuses, and a missing extra
        raise UserError(str(e)) from None
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {cfg['out_dir']} ({model.config.input_code}, {params:,} parameters, encoding "
          f"{enc.name}) to {hf_dir}")


if __name__ == "__main__":
    run_main(main)
