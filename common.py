"""
The helpers every script shares, importing nothing from this repository: the user-error type and the
entry point (run_main) that turns it, Ctrl-C and SIGTERM into one line; torchrun's rank and world
size; the one way signals are handled (StopSignals); device, precision and CPU threads (one `auto`
rule, one help text each); the progress bar and the matplotlib figure; a dataset's folder, meta.json
and the check of its token files against it; the hashes of the code and the data that sweep.py
records with each result; atomic file writes; one writer per run folder or results table
(hold_writer, releases_writer_locks); did-you-mean suggestions.

torch is imported inside the functions that use it, so that prepare.py, which needs no torch, starts
in a fraction of a second.
"""
import ast
import difflib
import fcntl
import functools
import hashlib
import json
import os
import signal
import socket
import sys
import time
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
    speak = torchrun_process()[0] == 0
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


def torchrun_process():
    """(rank, world size) of this process as torchrun sets them (RANK, WORLD_SIZE); (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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


THREADS_HELP = ("CPU threads of torch's operations; 0: auto, one thread on the CPU for a model doing under 10 GFLOP a "
                "call, else torch's own count; OMP_NUM_THREADS, when set, wins over auto")
SMALL_CALL_FLOPS = 1e10  # below this much work per call of the model, one CPU thread (BENCHMARKS.md, "A busy machine")


def set_threads(threads, device, model, tokens, backward=False):
    """torch's CPU threads for a tool whose calls of model take tokens each (forward only unless
    backward), set and returned: threads when it is a count; when 0 (auto), one on the CPU for a call
    under SMALL_CALL_FLOPS, whose operations are short: while other processes hold the cores, the
    thread that finishes one first spins waiting for its partner to be scheduled. Otherwise torch's
    own count, as is OMP_NUM_THREADS when set."""
    import torch
    if threads < 0:
        raise UserError(f"threads must be 0 (auto) or a count, got {threads}")
    flops = model.flops_per_token() * tokens * (1 if backward else 1 / 3)  # a forward is a third of training's
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and flops < SMALL_CALL_FLOPS and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def device_text(device):
    """The device as a tool's first line names it: the CPU with its thread count."""
    import torch
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else str(device)


def plot_figure(**options):
    """A matplotlib Figure of its own (no pyplot: no global state, no GUI backend to pick); matplotlib
    is an optional extra, so its absence is a UserError naming it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    return Figure(**options)


def progress(iterable=None, hide=False, **options):
    """A tqdm bar on stderr, shown only when stderr is a terminal (and not hide): in a log file or a
    pipe its carriage returns would pile up, so there a tool writes its own plain lines or none."""
    from tqdm import tqdm
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=hide or not sys.stderr.isatty(), **options)


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


SPLITS = ("train", "val", "test")
SHA256_KEY = "sha256"  # meta.json's {split: sha256 of SPLIT.bin}, recorded by prepare.py


def check_token_files(dataset, meta, splits=SPLITS, hashes=False):
    """Refuse token files that are not the ones prepare.py wrote: a size other than the token count
    meta.json records (cheap: train.py and eval.py check it at every start), and with hashes a sha256
    other than the one it records (sweep.py, prepare.py --check=True). Splits that meta.json does not
    list are not checked. Returns {split: sha256} of the files it hashed."""
    folder, found = data_dir(dataset), {}
    again = f"the file changed after prepare.py wrote it; run prepare.py for '{dataset}' again (--overwrite=True)"
    for split in [s for s in splits if f"{s}_tokens" in meta]:
        path, tokens = os.path.join(folder, f"{split}.bin"), meta[f"{split}_tokens"]
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing, though meta.json records {tokens:,} tokens in it: run prepare.py "
                            f"for '{dataset}' again (--overwrite=True)")
        size = os.path.getsize(path)
        if size != 2 * tokens:
            raise UserError(f"{path} is {size:,} bytes but meta.json records {tokens:,} tokens ({2 * tokens:,} "
                            f"bytes): {again}")
        if hashes:
            found[split] = file_sha256(path)
            recorded = meta.get(SHA256_KEY, {}).get(split)
            if recorded is not None and recorded != found[split]:
                raise UserError(f"{path} does not match the sha256 that meta.json records for it: {again}")
    return found


def unrecorded_note(dataset, meta):
    """A note for a dataset made before prepare.py recorded its files' sha256, or None: how to record them."""
    if SHA256_KEY in meta:
        return None
    folder = os.path.abspath(data_dir(dataset))
    root = "" if os.path.dirname(folder) == os.path.join(REPO, "data") else f" --out_root={os.path.dirname(folder)}"
    return (f"note: meta.json of dataset '{dataset}' records no sha256 of its token files (it was made before "
            f"prepare.py recorded them); to record them: python prepare.py --check=True{root} "
            f"--dataset={os.path.basename(folder)}")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def meta_text(meta):
    """meta.json as prepare.py writes it (and always has)."""
    return json.dumps(meta, indent=2) + "\n"


def hashed_meta(path):
    """meta.json's bytes as data_hash reads them: without the token files' sha256, which prepare.py
    records to check the files (and --check=True adds to older datasets), not to choose the tokens. As
    prepare.py writes meta.json with meta_text, a dataset hashes alike with and without them, so tables
    made before and after they were recorded compare."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(meta, dict) or SHA256_KEY not in meta:
        return raw
    return meta_text({k: v for k, v in meta.items() if k != SHA256_KEY}).encode()


def data_hash(dataset, digests=None):
    """sha256 (16 hex digits) of a dataset's meta.json (hashed_meta) and token files: the tokens a run
    trained and was scored on. digests: {split: sha256} already read (check_token_files), not read again."""
    digest = hashlib.sha256()
    folder = data_dir(dataset)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        digest.update(b"meta.json\0" + hashlib.sha256(hashed_meta(os.path.join(folder, "meta.json"))).digest())
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.bin")
        if os.path.isfile(path):
            known = (digests or {}).get(split) or file_sha256(path)
            digest.update(f"{split}.bin".encode() + b"\0" + bytes.fromhex(known))
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


# ------------------------------------------------------------------------ one writer at a time

WRITER_LOCK = "writer.lock"
WRITERS = {}  # the writer locks this process holds: lock file -> (its descriptor, a folder to remove if left empty)


def lock_file(target):
    """A run folder's lock is writer.lock inside it; a file's (a results table) is FILE.lock beside it."""
    return os.path.join(target, WRITER_LOCK) if os.path.isdir(target) else f"{target}.lock"


def releases_writer_locks(main):
    """Decorates a tool's main that takes writer locks (hold_writer): they are let go however it ends,
    whether run_main or a test or notebook calls it; a caller's own locks stay held."""
    @functools.wraps(main)
    def releasing(argv):
        held = set(WRITERS)
        try:
            return main(argv)
        finally:
            release_writers(keep=held)
    return releasing


def hold_writer(target, what, fix, made_folder=False, quiet=False):
    """Become the one writer of target, a run folder or a results table, until the tool's main ends
    (releases_writer_locks) or its process dies (the kernel lets go: an flock goes with its descriptor).
    While another process holds it, UserError: `what` is being written by it (tool, pid, host, since
    when), and `fix`. A lock file whose holder died without letting go (kill -9, out of memory) is taken
    over, with a note unless quiet; returns who had left it (for the caller's own words), or None.
    made_folder: target is a folder the caller just made, removed at the end if nothing was written in it.
    Readers (sample.py, serve.py, report.py) take no lock and are never blocked."""
    path = lock_file(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            where = "" if holder is None or holder["host"] == socket.gethostname() else f" on {holder['host']}"
            how = f" (kill {holder['pid']}{where})" if holder else ""
            raise UserError(f"{what} is being written by {described(holder)}: let it finish, or stop it{how}{fix}") \
                from None
        except OSError as e:  # a filesystem without locks (some network filesystems)
            os.close(fd)
            print(f"note: cannot lock {path} ({e.strerror}): a second writer of {what} would not be refused",
                  file=sys.stderr)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder let go and removed it while we waited for the flock: lock the new one
    left_by = lock_holder(fd)
    if left_by and not quiet:
        print(f"note: {what} was left locked by {described(left_by)}, which stopped without letting go of it "
              f"(killed?); taking it over", file=sys.stderr)
    me = {"tool": os.path.basename(sys.argv[0]), "pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    WRITERS[path] = (fd, target if made_folder else None)
    return left_by and described(left_by)


def lock_holder(fd):
    """What a lock file says of its holder: {tool, pid, host, since}, or None (empty: just made)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return holder if isinstance(holder, dict) and {"tool", "pid", "host", "since"} <= set(holder) else None
    except ValueError:
        return None


def described(holder):
    if holder is None:
        return "another process (it has not said which yet)"
    return f"{holder['tool']}, pid {holder['pid']} on {holder['host']} since {holder['since']}"


def release_writers(keep=()):
    """Let go of the writer locks this process holds (but those in keep): each lock file is removed
    before its descriptor closes, so that a process that opened it meanwhile finds it gone and locks anew."""
    for path in [path for path in WRITERS if path not in keep]:
        fd, folder = WRITERS.pop(path)
        try:
            os.remove(path)
        except FileNotFoundError:  # its folder was cleared meanwhile
            pass
        os.close(fd)
        if folder:
            try:
                os.rmdir(folder)  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                pass
