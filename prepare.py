"""
Text -> data/DATASET/train.bin, val.bin, optionally test.bin (raw little-endian uint16 token ids) and meta.json.

    python prepare.py                                        # offline quickstart: CPython's docs -> data/pydoc
    python prepare.py --input=assets/tinyshakespeare.txt.gz --dataset=shakespeare
    python prepare.py --input=assets/tinyshakespeare.txt.gz --dataset=study_bytes --encoding=bytes --test_fraction=0.1
    python prepare.py --input=assets/tinyshakespeare.txt.gz --dataset=shakespeare_4096 --encoding=cl100k_4096
    python prepare.py --input=assets/novels/ --dataset=novels --encoding=bytes   # the second corpus: two novels
    python prepare.py --input='shards/,more/*.jsonl.gz' --dataset=mine --encoding=bytes
    python prepare.py --input=web/ --input2=books.parquet --mix=0.7 --dataset=mine   # two local streams, mixed
    python prepare.py --hf=fineweb-edu+cosmopedia            # needs `pip install datasets` and a network
    python prepare.py my_data.py --workers=8                 # a config file: the same keys, as plain assignments
    python prepare.py --help                                 # every key, its value here, its meaning

Settings are config files of plain assignments, then --key=value, as for every script here
(configurator.py): an unknown key or a value of the wrong type is an error; --help lists the keys.

Inputs. --input is a comma-separated list of files (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet),
folders (their input files, recursively, in sorted order) and globs (quote them: --input='web/*.jsonl.gz');
to name a path that holds a comma, write ? for the comma. --input2, in the same form, is a second
stream mixed with the first (see Mixing). With neither, the input is CPython's documentation topics.

Documents. A .jsonl / .jsonl.gz line or a .parquet row is one document (its --text_field; a record
whose text is null or only whitespace is skipped, the nulls counted in a note). Plain text, and each
pydoc topic of the quickstart, is cut into documents at the first blank line after --doc_chars
characters, so even one .txt file has documents for a validation split; the blank lines at a cut are
dropped. Text with no blank line for 8 doc_chars is cut at a line end, and a line longer than that (a
file with no line breaks) after a space. On disk the end-of-text token PRECEDES every document: each
document, the first one too, starts right after eot, which is exactly what a generation prompted with
eot sees. A UTF-8 byte-order mark at the start of a file is dropped, with a note; Windows line ends
(CRLF) in plain text are kept and counted in a note.

Split. A document goes to val when a hash of (seed, its text) is below --val_fraction, to test when it
is below val_fraction + --test_fraction, else to train: the same input gives byte-identical files
whatever --workers is, and a duplicated document lands in one split only (but see below). A test
split is for choosing settings (a learning rate) on other text than the reported val loss is measured
on; --test_fraction=0 (the default) writes no test.bin and exactly the files of a version without
test splits. No split is empty when there are documents enough (one per split): the last ones go to
the splits still empty, with a note, and a copy of such a document earlier in the input stays in the
split its hash chose.

Mixing. With two streams (--input and --input2, or --hf=fineweb-edu+cosmopedia) the next document
comes from the stream furthest below its share of tokens (--mix for the first; None: 0.5, equal
shares), until --max_tokens or until a stream runs out (then it stops, so the shares hold). --hf
defaults to the paper's 17B-token budget; fineweb-edu's sample-10BT holds about 10B tokens, so a --mix
above ~0.55 needs a bigger sample (--hf_fineweb_edu=HuggingFaceFW/fineweb-edu:sample-100BT).

Replacing. A dataset folder holding data of other sources or settings (meta.json differs in encoding,
sources, split fractions, seed, doc_chars, text_field, max_tokens or mix) is replaced only with
--overwrite=True; the same input and settings again rewrite it identically. A split that takes far
more than its share of the tokens (too few documents) gets a note naming --val_fraction / --doc_chars.

Checks. Every setting and every input file is checked before anything is written: a bad value, a
missing or unreadable file, a parquet file without the text column, an unknown encoding or an
out_root that cannot be made is one line `error: ...` and exit status 1. A fault inside the text (a
line that is not JSON) is found when it is reached; that run stops with one line too.

Checking what was written. meta.json records each split's size (train_tokens, ...) and the sha256 of
its file (sha256: {split: hex}). train.py and eval.py refuse a file whose size differs (at every
start: cheap); sweep.py and `python prepare.py --check=True --dataset=NAME` compare the sha256 too,
and --check=True records them for a dataset made before they were recorded, without changing its
data_hash (common.hashed_meta), so results tables made before and after compare.

Streaming and atomicity. Documents are read lazily, tokenized in worker processes (a bounded window of
batches, collected in order) and appended to files in a temp dir beside data/DATASET; only a complete
run swaps it in. An error, a crash, Ctrl-C (exit 130) or SIGTERM (exit 143) leaves any previous
data/DATASET as it was.
"""
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import zlib
from collections import deque, namedtuple
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np

import tokenizer
from common import (SHA256_KEY, StopSignals, UserError, atomic_write, check_token_files, first_line, load_meta,
                    meta_text, progress, run_main, signal_of)
from configurator import parse_config, split_settings

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HF_STREAMS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu:sample-10BT",
              "cosmopedia": "HuggingFaceTB/smollm-corpus:cosmopedia-v2"}
HF_MAX_TOKENS = 17e9      # the paper's training budget
HF_VAL_FRACTION = 0.0005  # 8.5M val tokens of 17B
VAL_FRACTION = 0.1
BATCH_CHARS = 1 << 18     # text per worker task: big enough to amortize the inter-process transfer
SPACE_PIECE = 1 << 16     # whitespace runs longer than this are tokenized in pieces (encode_text)
LONG_SPACE_RUN = re.compile(r"(?<!\s)\s{%d,}" % (SPACE_PIECE + 1))  # from a run's start only: linear time
LONG_DOC_FACTOR = 8       # text with no blank line for this many doc_chars is cut at a line end (or a space)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair into one character
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a folder name every filesystem and shell takes
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

SETTINGS = {  # key: (default, meaning)
    "input": ("", "comma-separated files (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet), folders and globs; "
                  "'': CPython's documentation topics (offline quickstart)"),
    "input2": ("", "a second stream, in the same form, mixed with --input by tokens (see --mix); '': none"),
    "hf": ("", "stream from the Hugging Face Hub instead: fineweb-edu+cosmopedia (the paper's mixture), "
               "fineweb-edu or cosmopedia; needs `pip install datasets` and a network"),
    "hf_fineweb_edu": (HF_STREAMS["fineweb-edu"], "the fineweb-edu stream of --hf, as repo:config"),
    "hf_cosmopedia": (HF_STREAMS["cosmopedia"], "the cosmopedia stream of --hf, as repo:config"),
    "dataset": ("", "writes OUT_ROOT/DATASET, a folder name of letters, digits, _ - and . (not first); "
                    "'': pydoc, or with --hf its streams (fineweb_edu_cosmopedia); needed with --input"),
    "encoding": (tokenizer.DEFAULT_ENCODING, f"{', '.join(tokenizer.BUNDLED)} (bundled, offline: V = 2^K), "
                                             f"bytes (V = 257) or another tiktoken name with at most 65,536 ids"),
    "text_field": ("text", "the text field of .jsonl / .parquet / hub records"),
    "val_fraction": (None, f"share of documents in val, between 0 and 1; None: {VAL_FRACTION}, "
                           f"{HF_VAL_FRACTION} with --hf"),
    "test_fraction": (0.0, "share of documents in test (test.bin), from 0 to below 1 - val_fraction; 0: no test.bin"),
    "seed": (0, "picks which documents go to val and test (an integer of 64 bits)"),
    "doc_chars": (4000, "plain text is cut at the first blank line after this many characters (at least 1)"),
    "mix": (None, "with two streams, the first one's share of tokens, between 0 and 1 (fineweb-edu's with --hf); "
                  "None: 0.5"),
    "max_tokens": (None, f"stop before this many tokens in all, eot included (a whole number; 1e9 works); "
                         f"None: all the input, {HF_MAX_TOKENS:,.0f} with --hf"),
    "overwrite": (False, "True: replace a dataset prepared from other sources or settings (encoding, splits, ...); "
                         "the same input and settings again are always rewritten, identically"),
    "workers": (CPUS, "tokenizer processes, at least 1 (1: no pool); default: the CPUs this process may use"),
    "check": (False, "True: only check OUT_ROOT/DATASET's token files against its meta.json (sizes and sha256), "
                     "recording the sha256 if it has none yet (a dataset made before they were recorded)"),
    "out_root": (os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                 "writes OUT_ROOT/DATASET (default: data/ beside prepare.py)"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)

Document = namedtuple("Document", "tokens n_bytes split_key")  # tokens: uint16, eot first
WRITTEN = ("train.bin", "val.bin", "test.bin", "meta.json")  # all that OUT_ROOT/DATASET ever holds
# meta.json's keys that say which tokens a dataset holds: another value replaces it only with --overwrite
DATA_KEYS = ("encoding", "vocab_size", "source", "val_fraction", "test_fraction", "seed", "doc_chars", "text_field",
             "max_tokens", "mix")


class PrepareError(UserError):
    """A problem with the input or the settings, reported as one line."""


def note(message):
    print(f"note: {message}", file=sys.stderr)


# ---- settings: every value checked before anything is read or written ----

def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolved(config):
    """The settings with the defaults that depend on others filled in (those of --hf); PrepareError for
    any value that is not allowed."""
    args = SimpleNamespace(**config)
    if args.input2 and not args.input:
        raise PrepareError("--input2 is the second stream: give the first one with --input")
    if args.input and args.hf:
        raise PrepareError("--input and --hf exclude each other")
    hf_parts = args.hf.split("+") if args.hf else []
    if any(part not in HF_STREAMS for part in hf_parts) or len(set(hf_parts)) < len(hf_parts):
        raise PrepareError(f"--hf takes fineweb-edu+cosmopedia, fineweb-edu or cosmopedia, not {args.hf!r}")
    n_streams = 2 if args.input2 else 1 if args.input else len(hf_parts) or 1
    if args.input and not args.dataset:
        raise PrepareError("--input needs --dataset=NAME (the data goes to OUT_ROOT/NAME)")
    args.dataset = args.dataset or (args.hf.replace("+", "_").replace("-", "_") if args.hf else "pydoc")
    if not DATASET_NAME.fullmatch(args.dataset):
        raise PrepareError(f"--dataset must be a folder name of letters, digits, '_', '-' and '.' (not first), at "
                           f"most 200 of them, not {args.dataset!r}; choose where it goes with --out_root")

    if args.val_fraction is None:
        args.val_fraction = HF_VAL_FRACTION if args.hf else VAL_FRACTION
    if not (is_number(args.val_fraction) and 0 < args.val_fraction < 1):
        raise PrepareError(f"--val_fraction must be a number between 0 and 1 (both excluded), "
                           f"not {args.val_fraction!r}")
    if not (is_number(args.test_fraction) and 0 <= args.test_fraction < 1 - args.val_fraction):
        raise PrepareError(f"--test_fraction must be a number from 0 (no test split) to below 1 - val_fraction "
                           f"({1 - args.val_fraction:g}), not {args.test_fraction!r}")
    if args.mix is not None and n_streams != 2:
        raise PrepareError("--mix needs two streams: --input=A --input2=B, or --hf=fineweb-edu+cosmopedia")
    args.mix = 0.5 if args.mix is None else args.mix
    if not (is_number(args.mix) and 0 < args.mix < 1):
        raise PrepareError(f"--mix must be a number between 0 and 1 (both excluded), not {args.mix!r}")
    if args.max_tokens is None and args.hf:
        args.max_tokens = int(HF_MAX_TOKENS)
    if args.max_tokens is not None:
        whole = isinstance(args.max_tokens, int) or isinstance(args.max_tokens, float) and args.max_tokens.is_integer()
        if not (is_number(args.max_tokens) and whole and args.max_tokens >= 1):
            raise PrepareError(f"--max_tokens must be a whole number of at least 1 (or None: all the input), "
                               f"not {args.max_tokens!r}")
        args.max_tokens = int(args.max_tokens)
    for key in ("doc_chars", "workers"):
        if getattr(args, key) < 1:
            raise PrepareError(f"--{key} must be at least 1, not {getattr(args, key)}")
    if not -2 ** 63 <= args.seed < 2 ** 63:
        raise PrepareError(f"--seed must be an integer of 64 bits (-2^63 to 2^63 - 1), not {args.seed}")
    if not args.text_field:
        raise PrepareError("--text_field must name the records' text field, e.g. --text_field=text")
    for key in ("hf_fineweb_edu", "hf_cosmopedia"):
        if not getattr(args, key).partition(":")[0]:
            raise PrepareError(f"--{key} must be a Hugging Face dataset as repo or repo:config, "
                               f"not {getattr(args, key)!r}")
    if not args.out_root:
        raise PrepareError("--out_root must name a folder")
    return args


def load_encoding(name):
    try:
        return tokenizer.get_encoding(name)
    except ValueError as e:
        raise PrepareError(str(e)) from None


# ---- reading: every reader yields document texts lazily ----

def line_pieces(f, max_bytes):
    """The lines of binary file f, one longer than max_bytes in pieces of at most that many bytes, each
    cut after its last space, tab or CR, else before a character: so that a file with no line breaks
    (text8, say) is read in bounded memory and can be cut into documents."""
    rest = b""
    while raw := rest + f.readline(max_bytes - len(rest)):
        rest = b""
        if len(raw) == max_bytes and not raw.endswith(b"\n"):
            cut = max(raw.rfind(b" "), raw.rfind(b"\t"), raw.rfind(b"\r")) + 1
            if not cut:  # no space: before the last byte that starts a UTF-8 character
                cut = next((i for i in range(len(raw) - 1, 0, -1) if raw[i] & 0xC0 != 0x80), len(raw))
            raw, rest = raw[:cut], raw[cut:]
        yield raw


def utf8_lines(path, max_bytes=None):
    """The lines of a text file (gzipped if .gz), or with max_bytes its line_pieces; invalid UTF-8 is
    replaced with U+FFFD and counted. A byte-order mark that some editors write at the start is not text:
    it is dropped, with a note."""
    replaced = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for number, raw in enumerate(f if max_bytes is None else line_pieces(f, max_bytes)):
                # a '\n' byte never occurs inside a UTF-8 sequence, so lines can be decoded alone
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    replaced += len(line) - len(raw.decode("utf-8", errors="ignore"))
                if number == 0 and line.startswith("\ufeff"):
                    note(f"{path} starts with a UTF-8 byte-order mark (U+FEFF): dropped it")
                    line = line[1:]
                yield line
    except (OSError, EOFError, zlib.error) as e:  # gzip reports a corrupt stream as any of the three
        raise PrepareError(f"cannot read {path}: {e}") from None
    if replaced:
        note(f"{path} is not valid UTF-8: replaced {replaced:,} invalid byte sequences with U+FFFD")


def text_lines(path, max_bytes):
    """utf8_lines of a plain-text file; Windows line ends (CRLF) are counted in a note: their '\\r' stays in
    the tokens (in bytes it is a token of its own before every line end)."""
    crlf = 0
    for line in utf8_lines(path, max_bytes):
        crlf += line.endswith("\r\n")
        yield line
    if crlf:
        note(f"{path} has Windows line ends (CRLF) on {crlf:,} lines: their '\\r' stays in the tokens; "
             f"convert the file (dos2unix, or sed -i 's/\\r$//') to leave it out")


def paragraph_documents(lines, doc_chars):
    """Cut lines of plain text into documents at the first blank line after doc_chars characters."""
    doc, size = [], 0
    for line in lines:
        if line.endswith("\n") and not line.strip():  # not a piece of a long line that is all spaces
            if size >= doc_chars:
                yield "".join(doc)
                doc, size = [], 0
            elif doc:
                doc.append(line)
            continue
        if size >= LONG_DOC_FACTOR * doc_chars:  # e.g. one sentence per line: keep memory bounded
            yield "".join(doc)
            doc, size = [], 0
        doc.append(line)
        size += len(line)
    while doc and not doc[-1].strip():
        doc.pop()
    if doc:
        yield "".join(doc)


def record_texts(records, field, source):
    """(where, record) pairs -> the records' texts. A null text (how many datasets mark a missing value) is
    a document with no text, skipped as an empty one is, and counted in a note; any other non-string is
    an error."""
    nulls = 0
    for where, record in records:
        if not isinstance(record, dict) or field not in record:
            raise PrepareError(f"{where}: the record has no '{field}' field (choose the field with --text_field)")
        text = record[field]
        if text is None:
            nulls += 1
        elif isinstance(text, str):
            yield text
        else:
            raise PrepareError(f"{where}: '{field}' is {type(text).__name__}, not a string")
    if nulls:
        note(f"{source}: skipped the records whose '{field}' is null ({nulls:,}), as empty documents are")


def jsonl_records(path):
    for number, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number or nesting past json's limits
            reason = e.msg if isinstance(e, json.JSONDecodeError) else first_line(e)
            raise PrepareError(f"{path}:{number}: not JSON ({reason}); every line must be one JSON record") from None


def jsonl_documents(path, field):
    """The records' texts; a lone UTF-16 surrogate (a \\ud800 escape, which JSON allows and no UTF-8 text
    can hold) is replaced with U+FFFD and counted, as invalid UTF-8 is."""
    replaced = 0
    for text in record_texts(jsonl_records(path), field, path):
        text, lone = LONE_SURROGATE.subn("\ufffd", text)
        replaced += lone
        yield text
    if replaced:
        note(f"{path} holds lone UTF-16 surrogates: replaced {replaced:,} with U+FFFD")


def parquet_file(path, field):
    """The opened parquet file, after checking that it has the text column (done up front for every file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
    if field not in table.schema_arrow.names:
        raise PrepareError(f"{path}: no '{field}' column (it has {', '.join(table.schema_arrow.names)}); "
                           f"choose one with --text_field")
    return table


def parquet_column(path, table, field):
    try:
        for batch in table.iter_batches(columns=[field], batch_size=1024):
            yield from batch.column(0).to_pylist()
    except Exception as e:  # a corrupt row group, found only when it is read
        raise PrepareError(f"{path}: cannot read its '{field}' column ({e})") from None


def parquet_documents(path, field):
    rows = enumerate(parquet_column(path, parquet_file(path, field), field), 1)
    yield from record_texts(((f"{path}: row {row}", {field: text}) for row, text in rows), field, path)


def file_documents(path, args):
    if path.endswith((".txt", ".txt.gz")):
        return paragraph_documents(text_lines(path, LONG_DOC_FACTOR * args.doc_chars), args.doc_chars)
    if path.endswith(".parquet"):
        return parquet_documents(path, args.text_field)
    return jsonl_documents(path, args.text_field)


def walk_error(error):
    raise PrepareError(f"cannot list {error.filename}: {error.strerror}")


def usable_files(path):
    """path itself if it is an input file, or the input files under a directory, in sorted order."""
    if not os.path.isdir(path):
        return [path] if path.endswith(SUFFIXES) else []
    found, walked = [], set()
    # os.walk skips unreadable folders unless told, and linked folders unless told
    for folder, subfolders, names in os.walk(path, onerror=walk_error, followlinks=True):
        if os.path.realpath(folder) in walked:  # a link to a folder already read, or up the tree: a cycle
            subfolders.clear()
            continue
        walked.add(os.path.realpath(folder))
        subfolders.sort()
        found += [os.path.join(folder, name) for name in sorted(names) if name.endswith(SUFFIXES)]
    return found


def expand_inputs(key, value):
    """The input files that --key=value names, in order."""
    kinds = "/".join(SUFFIXES)
    files = []
    for pattern in value.split(","):
        if not pattern:
            raise PrepareError(f"--{key}={value!r} has an empty path: separate paths with single commas")
        if any(c in pattern for c in "*?[") and not os.path.lexists(pattern):  # a file may be called part[1].txt
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise PrepareError(f"no file matches {pattern}")
            found = [f for match in matches for f in usable_files(match)]
            if not found:
                raise PrepareError(f"{pattern} matches no {kinds} files")
        elif os.path.isdir(pattern):
            found = usable_files(pattern)
            if not found:
                raise PrepareError(f"directory {pattern} holds no {kinds} files")
        elif os.path.lexists(pattern):
            found = usable_files(pattern)
            if not found:
                raise PrepareError(f"{pattern}: unsupported file type; use {kinds}")
        elif "," in value and os.path.lexists(value):
            raise PrepareError(f"input not found: {pattern} (--{key} separates paths by commas; to name "
                               f"{value}, write ? for each comma)")
        else:
            raise PrepareError(f"input not found: {pattern}")
        files += found
    return files


def check_readable(path, text_field):
    """Open an input file once before anything is written, so that a missing or mistyped one is refused
    up front rather than after hours of tokenizing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # e.g. a link to a file that is gone
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        return  # a named pipe or a device: opening it here would block or consume its data
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    if path.endswith(".gz") and head and head != b"\x1f\x8b":
        raise PrepareError(f"{path} is not gzip-compressed, though its name ends in .gz")
    if path.endswith(".parquet"):
        parquet_file(path, text_field)


def pydoc_documents(doc_chars):
    from pydoc_data.topics import topics  # CPython's documentation topics: in every Python install
    for name in sorted(topics):
        yield from paragraph_documents(io.StringIO(topics[name]), doc_chars)


def hf_documents(spec, field):
    """Stream the records of a Hugging Face dataset 'repo:config' (train split)."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf needs the datasets package (and a network): pip install datasets") from None
    repo, _, config = spec.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    except Exception as e:  # network, authentication, a wrong name: all end the same way
        raise PrepareError(f"cannot stream {spec} from the Hugging Face Hub: {first_line(e)}") from None
    return record_texts(((f"{spec} record {number}", record) for number, record in hf_records(spec, dataset)),
                        field, spec)


def hf_records(spec, dataset):
    """(number, record), numbered from 1."""
    number = 0
    try:
        for number, record in enumerate(dataset, 1):
            yield number, record
    except Exception as e:  # the network can fail hours into a stream
        raise PrepareError(f"streaming {spec} failed after {number:,} records: {first_line(e)}") from None


def open_streams(args):
    """[(stream name, its sources, its document texts)]; every file is found and opened here, before
    anything is written."""
    if args.input:
        streams, seen = [], {}
        for key in ("input", "input2"):
            if not getattr(args, key):
                continue
            files = expand_inputs(key, getattr(args, key))
            for path in files:
                real = os.path.realpath(path)
                if real in seen:  # its documents would be read twice, perhaps into both streams
                    raise PrepareError(f"{path} is named twice (by --{seen[real]} and --{key})")
                seen[real] = key
                check_readable(path, args.text_field)
            texts = itertools.chain.from_iterable(file_documents(path, args) for path in files)
            streams.append((key, files, texts))
        return streams
    if args.hf:
        specs = {"fineweb-edu": args.hf_fineweb_edu, "cosmopedia": args.hf_cosmopedia}
        return [(part, [f"hf:{specs[part]}"], hf_documents(specs[part], args.text_field))
                for part in args.hf.split("+")]
    return [("pydoc", [f"pydoc_data.topics (Python {platform.python_version()})"], pydoc_documents(args.doc_chars))]


def output_dir(args):
    """OUT_ROOT/DATASET, after making OUT_ROOT; refuses what the final swap could not replace."""
    out_dir = os.path.join(args.out_root, args.dataset)
    if os.path.lexists(args.out_root) and not os.path.isdir(args.out_root):
        raise PrepareError(f"--out_root {args.out_root} is a file, not a folder")
    try:
        os.makedirs(args.out_root, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create --out_root {args.out_root}: {e.strerror}") from None
    if not os.access(args.out_root, os.W_OK | os.X_OK):
        raise PrepareError(f"cannot write in --out_root {args.out_root}: permission denied")
    if os.path.islink(out_dir):
        target = os.path.realpath(out_dir)
        raise PrepareError(f"{out_dir} is a symbolic link; prepare.py replaces folders, not links: write to its "
                           f"target with --out_root={os.path.dirname(target)} --dataset={os.path.basename(target)}")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir):  # the swap deletes the old folder whole: an input kept there would go with it
        try:
            foreign = sorted(set(os.listdir(out_dir)) - set(WRITTEN))
        except OSError as e:
            raise PrepareError(f"cannot list {out_dir}: {e.strerror}") from None
        if foreign:
            raise PrepareError(f"{out_dir} holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}, "
                               f"which prepare.py did not write and would delete with the old data: move "
                               f"{'them' if len(foreign) > 1 else 'it'} out, or write elsewhere with --dataset "
                               f"or --out_root")
    return out_dir


# ---- tokenizing in worker processes ----

def split_key(data, seed):
    """A number in [0, 1) fixed by the document's bytes and the seed; below val_fraction means val, then
    below val_fraction + test_fraction test."""
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def encode_text(enc, text):
    """enc.encode_ordinary(text), but a whitespace run of more than SPACE_PIECE characters is encoded in
    pieces of that many: tiktoken's regex overflows its stack on a run of about a million (a Rust panic).
    Text without such a run, all real text, is encoded whole, as before."""
    if len(text) <= SPACE_PIECE:
        return enc.encode_ordinary(text)
    tokens, start = [], 0
    for run in LONG_SPACE_RUN.finditer(text):
        for cut in range(run.start() + SPACE_PIECE, run.end(), SPACE_PIECE):
            tokens += enc.encode_ordinary(text[start:cut])
            start = cut
    return tokens + enc.encode_ordinary(text[start:])


def encode_batch(encoding_name, seed, texts):
    """texts -> (their tokens as one uint16 array, eot first in each; token counts; byte counts; split keys)."""
    enc = tokenizer.get_encoding(encoding_name)
    ids, lengths, sizes, keys = [], [], [], []
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")  # a hub stream's JSON may carry lone surrogates too
        try:
            tokens = encode_text(enc, text)  # a literal "<|endoftext|>" in the text stays text
        except BaseException as e:  # a Rust panic in tiktoken is a BaseException, and cannot be pickled
            if type(e).__name__ != "PanicException":
                raise
            raise PrepareError(f"tiktoken failed on a document of {len(text):,} characters beginning "
                               f"{text[:40]!r} ({first_line(e)})") from None
        ids.append(enc.eot_token)
        ids += tokens
        lengths.append(len(tokens) + 1)
        sizes.append(len(data))
        keys.append(split_key(data, seed))
    return np.array(ids, dtype="<u2"), lengths, sizes, keys


def batches(texts):
    batch, size = [], 0
    for text in texts:
        if not text.strip():
            continue  # a document with no text would only add an eot
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordered_map(pool, function, items, window):
    """pool.map with at most `window` tasks in flight (map itself would read the whole input ahead)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        while pending and (len(pending) >= window or pending[0].done()):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def encode_batch_into(folder, encode, numbered_texts):
    """A tokenizer process's task: encode(texts) saved as folder/NUMBER.npz, and that path its answer. An
    answer of a few bytes reaches the pipe whole or not at all. A process killed while it sent a large one
    (the tokens themselves) left the rest of the message owed, which ProcessPoolExecutor's reader waits
    for for ever (seen on CPython 3.11): prepare.py hung instead of saying that the process died."""
    number, texts = numbered_texts
    path = os.path.join(folder, f"{number}.npz")
    tokens, lengths, sizes, keys = encode(texts)
    np.savez(path, tokens=tokens, lengths=lengths, sizes=sizes, keys=keys)
    return path


def collected(path):
    """What encode_batch_into saved, read back, and its file removed."""
    with np.load(path) as saved:
        result = saved["tokens"], saved["lengths"].tolist(), saved["sizes"].tolist(), saved["keys"].tolist()
    os.remove(path)
    return result


def encoded_documents(texts, encode, pool, window, numbers):
    """Documents of texts, tokenized in batches by encode, here or (encode_batch_into) in the pool; numbers
    names the pool's batch files, shared by the streams."""
    if pool is None:
        results = map(encode, batches(texts))
    else:
        results = map(collected, ordered_map(pool, encode, zip(numbers, batches(texts)), window))
    for tokens, lengths, sizes, keys in results:
        ends = np.cumsum(lengths)
        for end, length, size, key in zip(ends, lengths, sizes, keys):
            yield Document(tokens[end - length:end], size, key)


def mixed(streams, shares, names):
    """(stream index, document), the next one from the stream furthest below its share of tokens."""
    tokens = [0] * len(streams)
    while True:
        i = min(range(len(streams)), key=lambda s: tokens[s] / shares[s])
        doc = next(streams[i], None)
        if doc is None:
            if len(streams) > 1:
                note(f"stream {names[i]} ran out after {tokens[i]:,} tokens; stopping so that the mix holds")
            return
        tokens[i] += len(doc.tokens)
        yield i, doc


def worker_signals():
    # Ctrl-C reaches the whole process group; only the main process handles it and ends the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tokenize_into(tmp_dir, streams, enc, args):
    """Write train.bin and val.bin into tmp_dir; returns their counts and the seconds it took."""
    encode = functools.partial(encode_batch, enc.name, args.seed)
    pool = batch_dir = None
    if args.workers > 1:
        pool = ProcessPoolExecutor(args.workers, initializer=worker_signals)
        batch_dir = os.path.join(tmp_dir, "batches")  # inside tmp_dir: gone with it if the run fails
        os.mkdir(batch_dir)
        encode = functools.partial(encode_batch_into, batch_dir, encode)
    numbers = itertools.count()
    start = time.time()
    try:
        encoded = [encoded_documents(texts, encode, pool, 4 * args.workers, numbers) for _, _, texts in streams]
        docs = mixed(encoded, [args.mix, 1 - args.mix] if len(streams) == 2 else [1.0], [n for n, _, _ in streams])
        sources = [source for _, stream_sources, _ in streams for source in stream_sources]
        described = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        with progress(total=args.max_tokens, unit="tok", unit_scale=True, desc=args.dataset, delay=2,
                      mininterval=1) as bar:
            counts, per_stream = write_splits(docs, tmp_dir, args.val_fraction, args.test_fraction, args.max_tokens,
                                              len(streams), bar, described)
        return counts, per_stream, time.time() - start
    except BrokenProcessPool:
        raise PrepareError(f"a tokenizer process died (killed, or out of memory?); try fewer --workers "
                           f"than {args.workers}") from None
    finally:
        if pool is not None:  # waits for the batches being tokenized, a fraction of a second; wait=False
            pool.shutdown(cancel_futures=True)  # races the interpreter's exit (Python 3.11: "Exception ignored")
            shutil.rmtree(batch_dir, ignore_errors=True)  # batches tokenized past --max_tokens


# ---- writing ----

def write_splits(docs, out_dir, val_fraction, test_fraction, max_tokens, n_streams, bar, source):
    """Append each document to train.bin, val.bin or test.bin; returns the counts for meta.json (the
    files' sha256 among them, hashed as they are written)."""
    splits = ("train", "val", "test") if test_fraction else ("train", "val")
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in splits}
    per_stream = [{"tokens": 0, "documents": 0} for _ in range(n_streams)]
    files = {split: open(os.path.join(out_dir, f"{split}.bin"), "wb") for split in counts}
    digests = {split: hashlib.sha256() for split in counts}

    def put(stream, doc, split):
        files[split].write(doc.tokens.tobytes())
        digests[split].update(doc.tokens.tobytes())
        for count in (counts[split], per_stream[stream]):
            count["tokens"] += len(doc.tokens)
            count["documents"] += 1
        counts[split]["bytes"] += doc.n_bytes

    def split_of(doc):
        if doc.split_key < val_fraction:
            return "val"
        return "test" if doc.split_key < val_fraction + test_fraction else "train"

    try:
        # the last len(splits) - 1 documents wait: they go to the splits that would be empty
        pending, total = deque(), 0
        for stream, doc in docs:
            if max_tokens is not None and total + len(doc.tokens) > max_tokens:
                break
            total += len(doc.tokens)
            if len(pending) == len(splits) - 1:
                put(*pending.popleft())
            pending.append((stream, doc, split_of(doc)))
            bar.update(len(doc.tokens))
        if not pending:
            raise PrepareError(f"no text to write: {source} holds no document"
                               + (" that fits in --max_tokens" if max_tokens is not None else ""))
        if sum(count["documents"] for count in counts.values()) == 0:
            single = "is a single document" if len(pending) == 1 else f"holds {len(pending)} documents"
            raise PrepareError(f"the input {single}, and {' and '.join(splits)} need one each: "
                               f"add text{', raise --max_tokens' if max_tokens is not None else ''}, "
                               f"or lower --doc_chars to cut plain text into more documents")
        for stream, doc, split in pending:
            empty = [s for s in ("val", "test", "train") if s in counts and counts[s]["documents"] == 0]
            if empty and empty[0] != split:
                note(f"no document's hash chose {empty[0]}, so one of the last documents fills it (a copy of it "
                     f"earlier in the input stays where it is)")
            put(stream, doc, empty[0] if empty else split)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    for split, digest in digests.items():
        counts[split]["sha256"] = digest.hexdigest()
    return counts, per_stream


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done: between the two renames of a swap there is no
    data/DATASET at all, and after them it is the new one. By then the run is complete, so it ends
    normally, with a note."""
    with StopSignals(defer=math.inf) as deferred:
        yield
    if deferred.caught:
        note(f"{signal.Signals(deferred.caught[0]).name} came while the new data was swapped in; that was let finish")


def swap_in(tmp_dir, out_dir):
    """Replace out_dir by tmp_dir: two renames, the old data deleted (three files: quick) only after the
    new is in place."""
    with signals_deferred():
        old_dir = None
        if os.path.exists(out_dir):
            parent, name = os.path.split(tmp_dir)
            old_dir = os.path.join(parent, name.replace(".tmp-", ".old-"))  # unique, as tmp_dir is
            os.rename(out_dir, old_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if old_dir:
                os.rename(old_dir, out_dir)
            raise
        if old_dir:
            shutil.rmtree(old_dir)


def make_meta(args, enc, streams, counts, per_stream):
    text_bytes = sum(count["bytes"] for count in counts.values())
    text_tokens = sum(count["tokens"] - count["documents"] for count in counts.values())
    meta = {
        "encoding": enc.name,
        "vocab_size": enc.n_vocab,
        "eot_token": enc.eot_token,
        "eot_position": "before each document",
        "dtype": "uint16",
        **{f"{split}_{field}": counts[split][field] for field in ("tokens", "documents", "bytes") for split in counts},
        "bytes_per_token": round(text_bytes / max(text_tokens, 1), 4),  # UTF-8 text bytes per token, eot not counted
        "source": [source for _, sources, _ in streams for source in sources],
        "val_fraction": args.val_fraction,
        **({"test_fraction": args.test_fraction} if "test" in counts else {}),  # without a test split: as before
        "seed": args.seed,
        "doc_chars": args.doc_chars,
        "text_field": args.text_field,
        "max_tokens": args.max_tokens,
    }
    if len(streams) == 2:
        meta["mix"] = args.mix
        meta["streams"] = [{"name": name, "source": sources, **count}
                           for (name, sources, _), count in zip(streams, per_stream)]
    meta[SHA256_KEY] = {split: count.get("sha256") for split, count in counts.items()}  # last: hashed_meta drops it
    return meta


def check_replacing(args, enc, streams, out_dir):
    """A dataset already in out_dir that other sources or settings made is replaced only with --overwrite:
    runs trained on it would otherwise meet other tokens (or refuse them) without a word."""
    path = os.path.join(out_dir, "meta.json")
    if args.overwrite or not os.path.isfile(path):
        return
    splits = ("train", "val", "test") if args.test_fraction else ("train", "val")
    empty = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in splits}
    planned = make_meta(args, enc, streams, empty, [{"tokens": 0, "documents": 0}] * len(streams))
    try:
        with open(path) as f:
            old = json.load(f)
        changed = [key for key in DATA_KEYS if normalized(old.get(key)) != normalized(planned.get(key))]
    except (OSError, ValueError, AttributeError):
        changed = ["meta.json (unreadable)"]
    if changed:
        first = changed[0]
        shown = f" ({first}: {old.get(first)!r} there, {planned.get(first)!r} now)" if first in DATA_KEYS else ""
        raise PrepareError(f"{out_dir} holds a dataset of other {', '.join(changed)}{shown}: pass --overwrite=True "
                           f"to replace it, or choose another --dataset")


def normalized(value):
    """Sources compared as paths (./a.txt is a.txt); every other value as it is."""
    if isinstance(value, list):
        return [os.path.normpath(v) if isinstance(v, str) and not v.startswith(("hf:", "pydoc")) else v for v in value]
    return value


def note_split_shares(meta, args):
    """A split far larger than its fraction: the text is too few documents for the hash to share it out."""
    total = sum(meta[f"{split}_tokens"] for split in ("train", "val", "test") if f"{split}_tokens" in meta)
    for split, fraction in (("val", args.val_fraction), ("test", args.test_fraction)):
        share = meta.get(f"{split}_tokens", 0) / total
        if fraction and share > max(2 * fraction, fraction + 0.05):
            documents = sum(meta[f"{s}_documents"] for s in ("train", "val", "test") if f"{s}_documents" in meta)
            note(f"{split} holds {share:.0%} of the tokens, for --{split}_fraction={fraction:g}: the text is only "
                 f"{documents:,} documents, and a document goes to one split whole; lower --doc_chars (now "
                 f"{args.doc_chars:,}) to cut plain text into more documents, or change --{split}_fraction")


def prepare(args, enc, streams, out_dir):
    """Tokenize into a temp dir beside out_dir and swap it in; returns (meta, seconds)."""
    for leftover in glob.glob(os.path.join(glob.escape(args.out_root), f".{glob.escape(args.dataset)}.*-*")):
        note(f"{leftover} is left from an interrupted run; delete it when no other prepare.py is running")
    tmp_dir = None
    try:
        tmp_dir = tempfile.mkdtemp(dir=args.out_root, prefix=f".{args.dataset}.tmp-")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; data/DATASET should be an ordinary folder
        counts, per_stream, seconds = tokenize_into(tmp_dir, streams, enc, args)
        meta = make_meta(args, enc, streams, counts, per_stream)
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            f.write(meta_text(meta))
            f.flush()
            os.fsync(f.fileno())
        swap_in(tmp_dir, out_dir)
    except OSError as e:  # a full disk, a folder gone: reading errors are PrepareErrors already
        raise PrepareError(f"cannot write {out_dir}: {e}") from None
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # already gone after a successful swap
    return meta, seconds


def report(out_dir, meta, seconds, workers):
    splits = [split for split in ("train", "val", "test") if f"{split}_tokens" in meta]
    tokens = sum(meta[f"{split}_tokens"] for split in splits)
    print(f"wrote {out_dir}: " + ", ".join(f"{split} {meta[f'{split}_tokens']:,} tokens in "
                                           f"{meta[f'{split}_documents']:,} documents" for split in splits))
    print(f"{meta['encoding']} (V={meta['vocab_size']:,}, eot={meta['eot_token']}): {meta['bytes_per_token']:.3f} "
          f"bytes/token; {tokens / seconds:,.0f} tokens/s in {seconds:.2f} s with {workers} worker(s)")


def check_dataset(out_dir):
    """--check=True: each token file's size and sha256 against meta.json (one line on a mismatch); a
    dataset made before prepare.py recorded the sha256 gets them recorded, in a meta.json that hashes
    as before (common.hashed_meta), so its data_hash does not change."""
    meta = load_meta(out_dir)
    found = check_token_files(out_dir, meta, hashes=True)
    names = ", ".join(f"{split}.bin" for split in found)
    if meta.get(SHA256_KEY) == found:
        print(f"{out_dir}: {names} match meta.json (sizes and sha256)")
        return
    path = os.path.join(out_dir, "meta.json")
    with open(path) as f:
        as_written = f.read() == meta_text(meta)
    if not as_written:  # rewritten, it would hash otherwise: tables that hold its data_hash would not compare
        note(f"{path} is not laid out as prepare.py writes it, so its sha256 were not recorded (that would change "
             f"its data_hash); the sizes of {names} match it")
        return
    atomic_write(path, lambda f: f.write(meta_text({**meta, SHA256_KEY: found}).encode()))
    print(f"{out_dir}: {names} match the sizes meta.json records; recorded their sha256 in it (its data_hash is "
          f"unchanged)")


def main(argv):
    args = resolved(parse_config(DEFAULTS, argv, MEANINGS, __doc__))
    if args.check:
        return check_dataset(os.path.join(args.out_root, args.dataset))
    enc = load_encoding(args.encoding)
    streams = open_streams(args)
    out_dir = output_dir(args)
    check_replacing(args, enc, streams, out_dir)
    try:
        meta, seconds = prepare(args, enc, streams, out_dir)
    except KeyboardInterrupt as e:
        what = "terminated" if signal_of(e) == signal.SIGTERM else "interrupted"
        print(f"{what}: {out_dir} is left as it was", file=sys.stderr)
        raise SystemExit(128 + signal_of(e)) from None
    report(out_dir, meta, seconds, args.workers)
    note_split_shares(meta, args)


if __name__ == "__main__":
    run_main(main)
