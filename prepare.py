"""
Text -> data/NAME/train.bin, val.bin (raw little-endian uint16 token ids) and meta.json.

    python prepare.py                                        # offline quickstart: CPython's docs -> data/pydoc
    python prepare.py --input assets/tinyshakespeare.txt.gz --name shakespeare
    python prepare.py --input shards/ more/*.jsonl.gz --name mine --encoding bytes
    python prepare.py --input web/ --input books.parquet --mix 0.7 --name mine   # two local streams, mixed
    python prepare.py --hf fineweb-edu+cosmopedia            # needs `pip install datasets` and a network

Documents. A .jsonl / .jsonl.gz line or a .parquet row is one document (its --text_field). Plain
text, and each pydoc topic of the quickstart, is cut into documents at the first blank line after
--doc_chars characters, so even one .txt file has documents for a validation split; the blank lines
at a cut are dropped. On disk the end-of-text token PRECEDES every document: each document, the first
one too, starts right after eot, which is exactly what a generation prompted with eot sees.

Split. A document goes to val when a hash of (seed, its text) is below --val_fraction: the same input
gives byte-identical files whatever --workers is, and a duplicated document lands in one split only.
With two or more documents neither split is empty: the last document goes to an empty split.

Mixing. With two streams (two --input groups, or --hf fineweb-edu+cosmopedia) the next document comes
from the stream furthest below its share of tokens (--mix for the first; default 0.5, equal shares),
until --max_tokens or until a stream runs out (then it stops, so the shares hold). --hf defaults to the
paper's 17B-token budget; fineweb-edu's sample-10BT holds about 10B tokens, so a --mix above ~0.55
needs a bigger sample (--hf_fineweb_edu HuggingFaceFW/fineweb-edu:sample-100BT).

Streaming and atomicity. Documents are read lazily, tokenized in worker processes (a bounded window of
batches, collected in order) and appended to files in a temp dir beside data/NAME; only a complete
run swaps it in. A crash or Ctrl-C leaves any previous data/NAME as it was.
"""
import argparse
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import deque, namedtuple

import numpy as np
from tqdm import tqdm

import tokenizer

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HF_STREAMS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu:sample-10BT",
              "cosmopedia": "HuggingFaceTB/smollm-corpus:cosmopedia-v2"}
HF_MAX_TOKENS = 17e9      # the paper's training budget
HF_VAL_FRACTION = 0.0005  # 8.5M val tokens of 17B
VAL_FRACTION = 0.1
BATCH_CHARS = 1 << 18     # text per worker task: big enough to amortize the inter-process transfer
LONG_DOC_FACTOR = 8       # text with no blank line for this many doc_chars is cut at a line end

Document = namedtuple("Document", "tokens n_bytes split_key")  # tokens: uint16, eot first


class PrepareError(Exception):
    """A problem with the input or the options, reported as one line."""


def note(message):
    print(f"note: {message}", file=sys.stderr)


# ---- reading: every reader yields document texts lazily ----

def utf8_lines(path):
    """The lines of a text file (gzipped if .gz); invalid UTF-8 is replaced with U+FFFD and counted."""
    replaced = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for raw in f:  # a '\n' byte never occurs inside a UTF-8 sequence, so lines can be decoded alone
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    replaced += len(line) - len(raw.decode("utf-8", errors="ignore"))
                yield line
    except (OSError, EOFError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    if replaced:
        note(f"{path} is not valid UTF-8: replaced {replaced:,} invalid byte sequences with U+FFFD")


def paragraph_documents(lines, doc_chars):
    """Cut lines of plain text into documents at the first blank line after doc_chars characters."""
    doc, size = [], 0
    for line in lines:
        if not line.strip():
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


def record_text(record, field, where):
    if not isinstance(record, dict) or field not in record:
        raise PrepareError(f"{where}: the record has no '{field}' field (choose the field with --text_field)")
    text = record[field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: '{field}' is {type(text).__name__}, not a string")
    return text


def jsonl_documents(path, field):
    for number, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{number}: not JSON ({e.msg}); every line must be one JSON record") from None
        yield record_text(record, field, f"{path}:{number}")


def parquet_documents(path, field):
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
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield record_text({field: text}, field, f"{path}: row {row}")


def file_documents(path, args):
    if path.endswith((".txt", ".txt.gz")):
        return paragraph_documents(utf8_lines(path), args.doc_chars)
    if path.endswith(".parquet"):
        return parquet_documents(path, args.text_field)
    return jsonl_documents(path, args.text_field)


def usable_files(path):
    """path itself if it is an input file, or the input files under a directory, in sorted order."""
    if not os.path.isdir(path):
        return [path] if path.endswith(SUFFIXES) else []
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        found += [os.path.join(folder, name) for name in sorted(names) if name.endswith(SUFFIXES)]
    return found


def expand_inputs(patterns):
    kinds = "/".join(SUFFIXES)
    files = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
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
        elif os.path.exists(pattern):
            found = usable_files(pattern)
            if not found:
                raise PrepareError(f"{pattern}: unsupported file type; use {kinds}")
        else:
            raise PrepareError(f"input not found: {pattern}")
        files += found
    return files


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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(f"cannot stream {spec} from the Hugging Face Hub: {reason}") from None
    return (record_text(record, field, f"{spec} record {number}") for number, record in enumerate(dataset, 1))


# ---- tokenizing in worker processes ----

def split_key(data, seed):
    """A number in [0, 1) fixed by the document's bytes and the seed; below val_fraction means val."""
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def encode_batch(encoding_name, seed, texts):
    """texts -> (their tokens as one uint16 array, eot first in each; token counts; byte counts; split keys)."""
    enc = tokenizer.get_encoding(encoding_name)
    ids, lengths, sizes, keys = [], [], [], []
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates
        tokens = enc.encode_ordinary(text)  # a literal "<|endoftext|>" in the text stays text
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


def ordered_imap(pool, function, items, window):
    """pool.imap with at most `window` tasks in flight (imap itself would read the whole input ahead)."""
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        while pending and (len(pending) >= window or pending[0].ready()):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def encoded_documents(texts, encode, pool, window):
    results = map(encode, batches(texts)) if pool is None else ordered_imap(pool, encode, batches(texts), window)
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


# ---- writing ----

def write_splits(docs, out_dir, val_fraction, max_tokens, n_streams, progress, source):
    """Append each document to train.bin or val.bin; returns the counts for meta.json."""
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in ("train", "val")}
    per_stream = [{"tokens": 0, "documents": 0} for _ in range(n_streams)]
    files = {split: open(os.path.join(out_dir, f"{split}.bin"), "wb") for split in counts}

    def put(stream, doc, split):
        files[split].write(doc.tokens.tobytes())
        for count in (counts[split], per_stream[stream]):
            count["tokens"] += len(doc.tokens)
            count["documents"] += 1
        counts[split]["bytes"] += doc.n_bytes

    try:
        pending, total = None, 0  # the last document waits: it goes to a split that would be empty
        for stream, doc in docs:
            if max_tokens is not None and total + len(doc.tokens) > max_tokens:
                break
            total += len(doc.tokens)
            if pending:
                put(*pending)
            pending = (stream, doc, "val" if doc.split_key < val_fraction else "train")
            progress.update(len(doc.tokens))
        if pending is None:
            raise PrepareError(f"no text to write: {source} holds no document"
                               + (" that fits in --max_tokens" if max_tokens is not None else ""))
        if counts["train"]["documents"] + counts["val"]["documents"] == 0:
            raise PrepareError("the input is a single document, and train and val need one each: "
                               "add text, or lower --doc_chars to cut plain text into more documents")
        stream, doc, split = pending
        empty = [s for s in ("val", "train") if counts[s]["documents"] == 0]
        put(stream, doc, empty[0] if empty else split)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    return counts, per_stream


def swap_in(tmp_dir, out_dir):
    """Replace out_dir by tmp_dir: two renames, the old data deleted only after the new is in place."""
    old_dir = None
    if os.path.exists(out_dir):
        old_dir = tmp_dir.replace(".tmp-", ".old-")  # unique, as tmp_dir is
        os.rename(out_dir, old_dir)
    os.rename(tmp_dir, out_dir)
    if old_dir:
        shutil.rmtree(old_dir)


def worker_signals():
    # Ctrl-C reaches the whole process group; only the main process handles it and ends the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- the command ----

class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here, instead of usage + error
        self.exit(2, f"error: {message} (see python prepare.py --help)\n")


def parse_args(argv):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="append", metavar="PATH",
                   help=f"files ({', '.join(SUFFIXES)}), directories or globs; give --input twice for two mixed "
                        f"streams (default: the offline pydoc quickstart corpus)")
    p.add_argument("--hf", help="stream from the Hugging Face Hub: fineweb-edu+cosmopedia (the paper's mixture), "
                                "fineweb-edu or cosmopedia; needs `pip install datasets` and a network")
    p.add_argument("--hf_fineweb_edu", default=HF_STREAMS["fineweb-edu"], help="its dataset, as repo:config")
    p.add_argument("--hf_cosmopedia", default=HF_STREAMS["cosmopedia"], help="its dataset, as repo:config")
    p.add_argument("--name", help="writes data/NAME (default: pydoc; with --hf its sources)")
    p.add_argument("--encoding", default=tokenizer.DEFAULT_ENCODING,
                   help="cl100k_65536 (bundled, V=65,536), bytes (V=257) or another tiktoken name")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl / .parquet / hub records")
    p.add_argument("--val_fraction", type=float,
                   help=f"share of documents in val (default {VAL_FRACTION}; {HF_VAL_FRACTION} with --hf)")
    p.add_argument("--seed", type=int, default=0, help="picks which documents go to val")
    p.add_argument("--doc_chars", type=int, default=4000, help="plain text is cut at the first blank line after this")
    p.add_argument("--mix", type=float,
                   help="with two streams, the first one's share of tokens (default 0.5; fineweb-edu's with --hf)")
    p.add_argument("--max_tokens", type=lambda s: int(float(s)),
                   help=f"stop before this many tokens in all (default: all the input; {HF_MAX_TOKENS:.0e} with --hf)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (1: no pool)")
    p.add_argument("--out_root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                   help="writes OUT_ROOT/NAME (default: data/ beside prepare.py)")
    args = p.parse_args(argv)
    if args.input and args.hf:
        p.error("--input and --hf exclude each other")
    if args.input and not args.name:
        p.error("--input needs --name (the data goes to data/NAME)")
    if args.hf and any(part not in HF_STREAMS for part in args.hf.split("+")):
        p.error(f"--hf takes fineweb-edu+cosmopedia, fineweb-edu or cosmopedia, not {args.hf!r}")
    hf = bool(args.hf)
    if args.name is None:
        args.name = args.hf.replace("+", "_").replace("-", "_") if hf else "pydoc"
    if args.val_fraction is None:
        args.val_fraction = HF_VAL_FRACTION if hf else VAL_FRACTION
    if args.max_tokens is None and hf:
        args.max_tokens = int(HF_MAX_TOKENS)
    n_streams = len(args.input) if args.input else len(args.hf.split("+")) if hf else 1
    if n_streams > 2:
        p.error("at most two streams (two --input groups) can be mixed")
    if not 0 < args.val_fraction < 1:
        p.error("--val_fraction must be between 0 and 1")
    if args.mix is not None and n_streams != 2:
        p.error("--mix needs two streams: --input A --input B, or --hf fineweb-edu+cosmopedia")
    args.mix = 0.5 if args.mix is None else args.mix
    if not 0 < args.mix < 1:
        p.error("--mix must be between 0 and 1")
    if args.doc_chars < 1 or args.workers < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        p.error("--doc_chars, --workers and --max_tokens must be positive")
    if args.name.startswith(".") or any(sep in args.name for sep in "/\\"):
        p.error(f"--name must be a plain folder name, not {args.name!r}")
    return args


def open_streams(args):
    """[(stream name, its sources, its document texts)]; fails here, before anything is written."""
    if args.input:
        streams = []
        for i, patterns in enumerate(args.input):
            files = expand_inputs(patterns)
            texts = itertools.chain.from_iterable(file_documents(path, args) for path in files)
            streams.append((f"input {i + 1}", files, texts))
        return streams
    if args.hf:
        specs = {"fineweb-edu": args.hf_fineweb_edu, "cosmopedia": args.hf_cosmopedia}
        return [(part, [f"hf:{specs[part]}"], hf_documents(specs[part], args.text_field))
                for part in args.hf.split("+")]
    return [("pydoc", [f"pydoc_data.topics (Python {platform.python_version()})"], pydoc_documents(args.doc_chars))]


def prepare(args):
    try:
        enc = tokenizer.get_encoding(args.encoding)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    streams = open_streams(args)
    out_dir = os.path.join(args.out_root, args.name)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"{out_dir} exists and is not a directory")
    os.makedirs(args.out_root, exist_ok=True)
    for leftover in glob.glob(os.path.join(glob.escape(args.out_root), f".{glob.escape(args.name)}.*-*")):
        note(f"{leftover} is left from an interrupted run; delete it when no other prepare.py is running")
    tmp_dir = tempfile.mkdtemp(dir=args.out_root, prefix=f".{args.name}.tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; data/NAME should be an ordinary folder
    try:
        counts, per_stream, seconds = tokenize_into(tmp_dir, streams, enc, args)
        meta = make_meta(args, enc, streams, counts, per_stream)
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        swap_in(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # already gone after a successful swap
    report(out_dir, meta, seconds, args.workers)


def tokenize_into(tmp_dir, streams, enc, args):
    """Write train.bin and val.bin into tmp_dir; returns their counts and the seconds it took."""
    encode = functools.partial(encode_batch, enc.name, args.seed)
    pool = multiprocessing.Pool(args.workers, initializer=worker_signals) if args.workers > 1 else None
    start = time.time()
    try:
        encoded = [encoded_documents(texts, encode, pool, window=4 * args.workers) for _, _, texts in streams]
        docs = mixed(encoded, [args.mix, 1 - args.mix] if len(streams) == 2 else [1.0], [n for n, _, _ in streams])
        sources = [source for _, stream_sources, _ in streams for source in stream_sources]
        described = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        with tqdm(total=args.max_tokens, unit="tok", unit_scale=True, desc=args.name, delay=2, mininterval=1) as bar:
            counts, per_stream = write_splits(docs, tmp_dir, args.val_fraction, args.max_tokens, len(streams),
                                              bar, described)
        return counts, per_stream, time.time() - start
    finally:
        if pool is not None:
            pool.terminate()


def make_meta(args, enc, streams, counts, per_stream):
    text_bytes = counts["train"]["bytes"] + counts["val"]["bytes"]
    documents = counts["train"]["documents"] + counts["val"]["documents"]
    text_tokens = counts["train"]["tokens"] + counts["val"]["tokens"] - documents
    meta = {
        "encoding": enc.name,
        "vocab_size": enc.n_vocab,
        "eot_token": enc.eot_token,
        "eot_position": "before each document",
        "dtype": "uint16",
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "train_documents": counts["train"]["documents"],
        "val_documents": counts["val"]["documents"],
        "train_bytes": counts["train"]["bytes"],
        "val_bytes": counts["val"]["bytes"],
        "bytes_per_token": round(text_bytes / max(text_tokens, 1), 4),  # UTF-8 text bytes per token, eot not counted
        "source": [source for _, sources, _ in streams for source in sources],
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "doc_chars": args.doc_chars,
        "text_field": args.text_field,
        "max_tokens": args.max_tokens,
    }
    if len(streams) == 2:
        meta["mix"] = args.mix
        meta["streams"] = [{"name": name, "source": sources, **count}
                           for (name, sources, _), count in zip(streams, per_stream)]
    return meta


def report(out_dir, meta, seconds, workers):
    tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens in {meta['train_documents']:,} documents, "
          f"val {meta['val_tokens']:,} tokens in {meta['val_documents']:,} documents")
    print(f"{meta['encoding']} (V={meta['vocab_size']:,}, eot={meta['eot_token']}): {meta['bytes_per_token']:.3f} "
          f"bytes/token; {tokens / seconds:,.0f} tokens/s in {seconds:.2f} s with {workers} worker(s)")


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill cleans up its temp dir too
    try:
        prepare(args)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"interrupted: {os.path.join(args.out_root, args.name)} is left as it was", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
