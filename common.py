"""
The helpers every script shares, importing nothing from this repository: the user-error type and the
entry point (run_main) that turns it, Ctrl-C and SIGTERM into one line; the one way signals are
handled (StopSignals); device and precision (one `auto` rule, one help text each); a dataset's folder
and meta.json; the hashes of the code and the data that sweep.py records with each result; atomic file
writes; did-you-mean suggestions.

torch is imported inside the functions that use it, so that prepare.py, which needs no torch, starts
in a fraction of a second.
"""
import ast
import difflib
import hashlib
import json
import os
import signal
import sys
from contextlib import nullcontext

REPO = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("auto", "float32", "bfloat16", "float16")
META_KEYS = ("encoding", "vocab_size", "eot_token", "train_tokens", "val_tokens")
EVAL_FILES = {"val": "eval.json", "test": "eval_test.json"}  # what eval.py writes into out_dir, by split
TORCH_SEEDS = (-2 ** 63, 2 ** 64 - 1)  # the seeds torch.manual_seed and Generator.manual_seed take
DEVICE_HELP = "auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "auto (bfloat16 on GPUs that have it, float16 on older ones, float32 on CPU), float32, bfloat16 or float16"


class UserError(ValueError):
    """A problem the user can fix (a bad setting, a missing file): printed as one line, no traceback."""


def run_main(main, argv=None):
    """Run a script's main(argv): a UserError becomes `error: ...` on stderr and exit code 1; Ctrl-C
    or SIGTERM one line and exit code 128 + the signal (130, 143), as shells report them. Under
    torchrun only rank 0 speaks, so a configuration error is printed once."""
    speak = int(os.environ.get("RANK", 0)) == 0
    try:
        with StopSignals():
            main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if speak:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if speak:
            print(f"interrupted ({signal.Signals(signal_of(e)).name})", file=sys.stderr)
        sys.exit(128 + signal_of(e))
    except BrokenPipeError:  # stdout piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def closest(name, known):
    """' (did you mean X?)' for the entry of known nearest to a misspelt name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(error):
    """An exception's message as one line (its type's name when it has none), for an `error:` line."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# -------------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The one way every tool handles Ctrl-C and SIGTERM. While open, the first `defer` of them are
    only noted in `caught`, for a tool that stops at a safe point of its own (train.py checkpoints at
    the next step boundary; prepare.py finishes swapping its data in); any further one raises
    KeyboardInterrupt(signum) at once, which run_main turns into one line and exit code 128 + signum.
    SIGTERM thus unwinds as Ctrl-C does: the files being written are temp files, cleaned up on the way
    out. Open one with `with`, or call close() to put back the handlers it replaced. `noted`, when
    given, is a line said at once for each deferred signal (written straight to stderr's file: a
    handler that went through sys.stderr could interrupt a write of the main code to it)."""

    def __init__(self, defer=0, noted=""):
        self.defer, self.caught, self.noted = defer, [], noted
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}

    def handle(self, signum, frame):
        if len(self.caught) >= self.defer:
            raise KeyboardInterrupt(signum)
        self.caught.append(signum)
        if self.noted:
            os.write(2, f"\n{signal.Signals(signum).name}: {self.noted}\n".encode())

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def signal_of(interrupt):
    """The signal a KeyboardInterrupt stands for: StopSignals passes it along; Python's own is SIGINT."""
    return interrupt.args[0] if interrupt.args else signal.SIGINT


# ------------------------------------------------------------------------------ device, precision

def resolve_device(name):
    """'auto' -> cuda when there is a GPU, else cpu; a torch.device, or UserError for a device torch
    does not know or this machine lacks."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device '{name}' is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but CUDA is not available here: use --device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' asked for, but MPS is not available here: use --device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{name}' is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name, device):
    """The one `auto` rule, for training and inference alike: bfloat16 on a GPU that supports it,
    float16 on an older GPU (training then scales the loss), float32 on CPU and MPS."""
    import torch
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device, dtype):
    """A fresh context to run the model in: as is for float32, else autocast to dtype. Fresh, because
    an autocast object keeps state while entered and the server enters them from several threads."""
    import torch
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------- data

def run_folder(out_dir):
    """The run folder that out_dir names: out_dir itself, or the folder of a checkpoint file given as
    out_dir (every tool that reads a checkpoint takes both --out_dir=RUN and --out_dir=RUN/ckpt.pt)."""
    return os.path.dirname(os.path.abspath(out_dir)) if os.path.isfile(out_dir) else out_dir


def data_dir(dataset):
    """A dataset is a name under data/ beside this file, or a path to a folder (it has a '/')."""
    if "/" in dataset or os.sep in dataset:
        return dataset
    return os.path.join(REPO, "data", dataset)


def load_meta(dataset):
    """The meta.json of a dataset written by prepare.py, checked for the keys the scripts rely on."""
    if not dataset:
        raise UserError("no dataset given: pass --dataset=NAME (a folder under data/ written by prepare.py)")
    path = os.path.join(data_dir(dataset), "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"dataset '{dataset}' not found ({path} is missing): run prepare.py first, "
                        f"e.g. python prepare.py")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): run prepare.py again for '{dataset}'") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it was not written by prepare.py; run it again")
    return meta


def make_dataset(dataset, prepare_args):
    """Run prepare.py with prepare_args (a list, as a config's `prepare` names them) to make a dataset
    that is missing, saying so in one line; UserError with prepare.py's own error when it fails."""
    import shlex
    import subprocess
    folder = data_dir(dataset)
    args = [*prepare_args, f"--out_root={os.path.dirname(os.path.abspath(folder))}",
            f"--dataset={os.path.basename(folder)}"]
    print(f"dataset '{dataset}' is missing, making it: python prepare.py {shlex.join(args)}", file=sys.stderr,
          flush=True)
    done = subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines() or ["no message"]
        raise UserError(f"prepare.py failed to make dataset '{dataset}': {said[-1].removeprefix('error: ')}")


def data_hash(dataset):
    """sha256 (16 hex digits) of a dataset's meta.json and token files: the tokens a run trained and was scored on."""
    digest = hashlib.sha256()
    folder = data_dir(dataset)
    for name in ("meta.json", "train.bin", "val.bin", "test.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            file_digest = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(block)
            digest.update(name.encode() + b"\0" + file_digest.digest())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------ code version

def code_files():
    """train.py, eval.py and every module of this repository they import, transitively: the code that
    decides a run's losses (and some that does not, such as error texts: a change there counts too)."""
    todo, found = ["train.py", "eval.py"], set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            files = [f"{module.split('.')[0]}.py" for module in modules]
            todo += [file for file in files if os.path.isfile(os.path.join(REPO, file))]
    return sorted(found)


def code_hash():
    """sha256 (16 hex digits) over the names and contents of code_files(): runs of one code hash were made
    by the same code, whatever the commit (uncommitted edits count)."""
    digest = hashlib.sha256()
    for name in code_files():
        with open(os.path.join(REPO, name), "rb") as f:
            digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ files

def atomic_write(path, write):
    """write(f) into a temp file beside path, fsync, rename: readers see the old file or the new one.
    A write that fails (a full disk) is a UserError, with the old file kept and no temp file left."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"is the disk full? torch: {first_line(e)}"
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise UserError(f"cannot write {path} ({reason}): {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
