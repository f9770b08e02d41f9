"""prepare.py, run as a subprocess on real text: round trips, meta vs files, determinism, mixing, config files
and --help; every bad setting or input refused with one line, leaving earlier data as it was; Ctrl-C, SIGTERM and a
killed tokenizer process."""
import glob
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque

import numpy as np
import pytest

import common
import prepare
import tokenizer
from conftest import SHAKESPEARE, TINY_MODEL, limited_file_size, run_tool, shakespeare_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prepare(out_root, *args, env=None):
    """prepare.py --out_root=OUT_ROOT ARGS...: a later --out_root among args overrides it."""
    return subprocess.run([sys.executable, "prepare.py", f"--out_root={out_root}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def prepared(out_root, *args):
    result = run_prepare(out_root, *args)
    assert result.returncode == 0, result.stderr
    return result


def load(out_dir):
    """meta.json and both token files, after checking that they agree with each other (sizes, sha256)."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    enc = tokenizer.get_encoding(meta["encoding"])
    assert (meta["vocab_size"], meta["eot_token"]) == (enc.n_vocab, enc.eot_token)
    tokens = {}
    for split in ("train", "val"):
        path = os.path.join(out_dir, f"{split}.bin")
        tokens[split] = np.memmap(path, dtype=np.uint16, mode="r")
        assert os.path.getsize(path) == 2 * meta[f"{split}_tokens"]
        assert meta["sha256"][split] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert len(tokens[split]) == meta[f"{split}_tokens"] > 0
        assert tokens[split].max() < meta["vocab_size"]
        assert tokens[split][0] == meta["eot_token"]  # eot precedes every document
        assert np.count_nonzero(tokens[split] == meta["eot_token"]) == meta[f"{split}_documents"]
    return meta, tokens


def documents(tokens, meta, with_lengths=False):
    """The decoded text of each document in a token file (and its length in tokens, eot included)."""
    enc = tokenizer.get_encoding(meta["encoding"])
    starts = np.flatnonzero(tokens == meta["eot_token"])
    docs = [(enc.decode_bytes(tokens[a + 1:b].tolist()).decode("utf-8"), b - a)
            for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]
    return docs if with_lengths else [text for text, _ in docs]


def skip_blank_lines(text, pos):
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end + 1
        if text[pos:end].strip():
            break
        pos = end
    return pos


def assert_cut_from(texts, train_docs, val_docs):
    """Merged back in input order, the documents are the texts minus the blank lines where they were cut."""
    queues = [deque(train_docs), deque(val_docs)]
    for text in texts:
        pos = skip_blank_lines(text, 0)
        while pos < len(text):
            queue = next((q for q in queues if q and text.startswith(q[0], pos)), None)
            assert queue is not None, f"no document continues the input at {pos}: {text[pos:pos + 60]!r}"
            pos = skip_blank_lines(text, pos + len(queue.popleft()))
    assert not queues[0] and not queues[1], "documents left over that are not in the input"


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tinyshakespeare.txt"
    path.write_text(shakespeare_text(), encoding="utf-8")
    return path


def test_quickstart_with_no_arguments_uses_the_pydoc_topics(tmp_path):
    from pydoc_data.topics import topics
    result = prepared(tmp_path)
    meta, tokens = load(tmp_path / "pydoc")
    assert meta["encoding"] == "cl100k_65536" and meta["vocab_size"] == 65536 and meta["eot_token"] == 65535
    assert "pydoc_data" in meta["source"][0]
    assert meta["val_tokens"] >= 20 * 128, "the quickstart's val split must hold many blocks of 128 tokens"
    train_docs, val_docs = documents(tokens["train"], meta), documents(tokens["val"], meta)
    assert_cut_from([topics[name] for name in sorted(topics)], train_docs, val_docs)
    assert "bytes/token" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.parametrize("encoding", ["cl100k_65536", "cl100k_4096", "bytes"])
def test_shakespeare_round_trip(tmp_path, shakespeare_file, encoding):
    prepared(tmp_path, f"--input={shakespeare_file}", "--dataset=shakespeare", f"--encoding={encoding}")
    meta, tokens = load(tmp_path / "shakespeare")
    assert meta["encoding"] == encoding and meta["source"] == [str(shakespeare_file)]
    train_docs, val_docs = documents(tokens["train"], meta), documents(tokens["val"], meta)
    assert not set(train_docs) & set(val_docs)
    assert_cut_from([shakespeare_text()], train_docs, val_docs)
    assert meta["train_bytes"] == sum(len(d.encode()) for d in train_docs)
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val_docs)
    if encoding == "bytes":
        assert meta["vocab_size"] == 257 and meta["eot_token"] == 256 and meta["bytes_per_token"] == 1.0


def test_reruns_are_byte_identical_whatever_the_workers(tmp_path, shakespeare_file):
    outputs = []
    for workers, root in [(1, "a"), (2, "b"), (2, "b")]:  # the third run replaces the second's data
        prepared(tmp_path / root, f"--input={shakespeare_file}", "--dataset=s", f"--workers={workers}",
                 "--doc_chars=1000")
        outputs.append({f: (tmp_path / root / "s" / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")})
    assert outputs[0] == outputs[1] == outputs[2]
    assert sorted(os.listdir(tmp_path / "b")) == ["s"]  # no temp or old folder left


def test_a_test_split_comes_out_of_train_and_leaves_val_as_it_was(tmp_path, shakespeare_file):
    prepared(tmp_path / "a", f"--input={shakespeare_file}", "--dataset=s", "--encoding=bytes")
    prepared(tmp_path / "b", f"--input={shakespeare_file}", "--dataset=s", "--encoding=bytes", "--test_fraction=0.1")
    old_meta, old = load(tmp_path / "a" / "s")
    meta, new = load(tmp_path / "b" / "s")
    assert not os.path.exists(tmp_path / "a" / "s" / "test.bin")  # test_fraction 0: the files of before
    assert not [key for key in old_meta if key.startswith("test_")]
    test = np.memmap(tmp_path / "b" / "s" / "test.bin", dtype=np.uint16, mode="r")
    assert len(test) == meta["test_tokens"] > 0 and test[0] == meta["eot_token"]
    assert np.count_nonzero(test == meta["eot_token"]) == meta["test_documents"]
    assert meta["test_fraction"] == 0.1 and 0.05 < meta["test_documents"] / meta["train_documents"] < 0.2
    assert new["val"].tobytes() == old["val"].tobytes()
    test_docs = documents(test, meta)
    assert sorted(documents(new["train"], meta) + test_docs) == sorted(documents(old["train"], meta))
    assert meta["test_bytes"] == sum(len(d.encode()) for d in test_docs)


def test_three_documents_fill_three_splits_and_two_are_refused(tmp_path):
    paragraphs = [p for p in shakespeare_text().split("\n\n") if p.strip()][:3]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    prepared(tmp_path, f"--input={tmp_path / 'docs.jsonl'}", "--dataset=d", "--test_fraction=1e-9")
    meta, _ = load(tmp_path / "d")
    assert (meta["train_documents"], meta["val_documents"], meta["test_documents"]) == (1, 1, 1)
    with open(tmp_path / "two.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs[:2])
    result = run_prepare(tmp_path, f"--input={tmp_path / 'two.jsonl'}", "--dataset=e", "--test_fraction=0.1")
    assert result.returncode == 1 and result.stderr.startswith("error: the input holds 2 documents, and train")


def write_jsonl_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_mixing_two_streams_of_hub_style_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from pydoc_data.topics import topics
    # Stand-ins for the two hub streams, in their record formats: fineweb-edu shards as .jsonl.gz
    # (text, id, url, score) and cosmopedia-v2 as parquet (prompt, text, audience, format).
    text = shakespeare_text()
    web = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    (tmp_path / "web").mkdir()
    for shard in range(2):
        write_jsonl_gz(tmp_path / "web" / f"shard_{shard}.jsonl.gz",
                       [{"text": t, "id": f"{shard}-{i}", "url": "https://example.org", "score": 3.1}
                        for i, t in enumerate(web[shard::2])])
    (tmp_path / "web" / "README.md").write_text("not an input file")
    web = web[0::2] + web[1::2]  # shard order
    books = list(dict.fromkeys(topics[name] for name in sorted(topics)))  # two topics share one text
    pq.write_table(pa.table({"prompt": ["write a textbook"] * len(books), "text": books,
                             "audience": ["students"] * len(books), "format": ["textbook"] * len(books)}),
                   tmp_path / "cosmo.parquet", row_group_size=16)

    def check(out_dir, mix, max_tokens=None):
        meta, tokens = load(out_dir)
        origin = {t: (0, i) for i, t in enumerate(web)} | {t: (1, i) for i, t in enumerate(books)}
        stream_tokens = [0, 0]
        taken = {0: [], 1: []}
        for split in ("train", "val"):
            order = {0: [], 1: []}
            for doc, length in documents(tokens[split], meta, with_lengths=True):
                stream, index = origin[doc]
                order[stream].append(index)
                stream_tokens[stream] += length
            for stream in (0, 1):
                assert order[stream] == sorted(order[stream]), "a stream's records were reordered"
                taken[stream] += order[stream]
        for stream in (0, 1):  # each stream contributed a prefix of its records, each one once
            assert sorted(taken[stream]) == list(range(len(taken[stream])))
        assert [s["tokens"] for s in meta["streams"]] == stream_tokens
        total = sum(stream_tokens)
        assert total == meta["train_tokens"] + meta["val_tokens"]
        if max_tokens:
            assert total <= max_tokens
        biggest = max(len(tokenizer.get_encoding().encode_ordinary(t)) + 1 for t in web + books)
        assert abs(stream_tokens[0] - mix * total) <= biggest
        return meta

    prepared(tmp_path / "out", f"--input={tmp_path / 'web'}", f"--input2={tmp_path / '*.parquet'}",
             "--dataset=mix", "--mix=0.3", "--max_tokens=6e4")
    meta = check(tmp_path / "out" / "mix", 0.3, 60_000)
    assert meta["mix"] == 0.3 and meta["max_tokens"] == 60_000
    assert meta["streams"][0]["source"] == [str(tmp_path / "web" / f"shard_{i}.jsonl.gz") for i in range(2)]
    # With no budget, it stops when the smaller stream (the pydoc "books") runs out, keeping the mix.
    result = prepared(tmp_path / "out", f"--input={tmp_path / 'web'}", f"--input2={tmp_path / 'cosmo.parquet'}",
                      "--dataset=mix", "--mix=0.7", "--overwrite=True")
    assert "ran out" in result.stderr
    check(tmp_path / "out" / "mix", 0.7)


@pytest.mark.parametrize("val_fraction, empty_by_hash", [(1e-9, "val"), (1 - 1e-9, "train")])
def test_both_splits_get_documents_and_duplicates_stay_in_one(tmp_path, val_fraction, empty_by_hash):
    paragraphs = shakespeare_text().split("\n\n")[:30]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs + paragraphs)
    result = prepared(tmp_path, f"--input={tmp_path / 'docs.jsonl'}", "--dataset=d", f"--val_fraction={val_fraction}")
    assert f"no document's hash chose {empty_by_hash}" in result.stderr
    meta, tokens = load(tmp_path / "d")
    assert meta[f"{empty_by_hash}_documents"] == 1  # the last document, which the hash sent to the other split
    train_docs, val_docs = documents(tokens["train"], meta), documents(tokens["val"], meta)
    assert sorted(train_docs + val_docs) == sorted(paragraphs + paragraphs)
    last = paragraphs[-1]
    assert not (set(train_docs) - {last}) & (set(val_docs) - {last})


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("earlier")
    (root / "prev.jsonl").write_text("".join(json.dumps({"text": f"document {i}\n"}) + "\n" for i in range(20)))
    prepared(root / "data", f"--input={root / 'prev.jsonl'}", "--dataset=prev")
    return root / "data" / "prev"


@pytest.fixture
def previous(tmp_path, earlier_run):
    """An out_root already holding data/prev from an earlier good run, and a snapshot of its bytes."""
    shutil.copytree(earlier_run, tmp_path / "data" / "prev")
    return tmp_path / "data", {f: (earlier_run / f).read_bytes() for f in os.listdir(earlier_run)}


def assert_untouched(previous):
    root, snapshot = previous
    assert sorted(os.listdir(root)) == ["prev"], "a temp folder was left behind"
    assert {f: (root / "prev" / f).read_bytes() for f in os.listdir(root / "prev")} == snapshot


def plugin_path(tmp_path):
    """A tiktoken_ext plugin registering 'oversized': a real Encoding of 256 bytes + 65,536 pairs + eot."""
    (tmp_path / "plugin" / "tiktoken_ext").mkdir(parents=True)
    (tmp_path / "plugin" / "tiktoken_ext" / "oversized_test.py").write_text(
        "def oversized():\n"
        "    ranks = {bytes([i]): i for i in range(256)}\n"
        "    for pair in range(65536):\n"
        "        ranks.setdefault(pair.to_bytes(2, 'big'), len(ranks))\n"
        "    return {'name': 'oversized', 'pat_str': r'\\S+|\\s+', 'mergeable_ranks': ranks,\n"
        "            'special_tokens': {'<|endoftext|>': len(ranks)}}\n"
        "ENCODING_CONSTRUCTORS = {'oversized': oversized}\n")
    return str(tmp_path / "plugin")


REFUSED_SETTINGS = {  # case: (arguments, words the error must hold); {good} and {other} are valid .jsonl files
    "val_fraction 0": (["--input={good}", "--val_fraction=0"], "--val_fraction must be a number between 0 and 1"),
    "val_fraction 1": (["--input={good}", "--val_fraction=1"], "--val_fraction must be a number between 0 and 1"),
    "val_fraction 1.5": (["--input={good}", "--val_fraction=1.5"], "not 1.5"),
    "val_fraction a word": (["--input={good}", "--val_fraction=half"], "not 'half'"),
    "test_fraction -0.1": (["--input={good}", "--test_fraction=-0.1"], "--test_fraction must be a number from 0"),
    "test_fraction leaving no train": (["--input={good}", "--test_fraction=0.9"], "below 1 - val_fraction (0.9)"),
    "mix 0": (["--input={good}", "--input2={other}", "--mix=0"], "--mix must be a number between 0 and 1"),
    "mix 1": (["--input={good}", "--input2={other}", "--mix=1"], "--mix must be a number between 0 and 1"),
    "mix -0.5": (["--input={good}", "--input2={other}", "--mix=-0.5"], "not -0.5"),
    "mix of one stream": (["--input={good}", "--mix=0.3"], "--mix needs two streams"),
    "doc_chars 0": (["--input={good}", "--doc_chars=0"], "--doc_chars must be at least 1, not 0"),
    "doc_chars a float": (["--input={good}", "--doc_chars=1e3"], "'doc_chars' on the command line must be int"),
    "workers 0": (["--input={good}", "--workers=0"], "--workers must be at least 1, not 0"),
    "workers -2": (["--input={good}", "--workers=-2"], "--workers must be at least 1, not -2"),
    "max_tokens 0": (["--input={good}", "--max_tokens=0"], "--max_tokens must be a whole number of at least 1"),
    "max_tokens -5": (["--input={good}", "--max_tokens=-5"], "not -5"),
    "max_tokens 1.5": (["--input={good}", "--max_tokens=1.5"], "not 1.5"),
    "max_tokens a word": (["--input={good}", "--max_tokens=lots"], "not 'lots'"),
    "seed beyond 64 bits": (["--input={good}", f"--seed={2 ** 64}"], "--seed must be an integer of 64 bits"),
    "no text field name": (["--input={good}", "--text_field="], "--text_field must name"),
    "dataset that climbs out": (["--input={good}", "--dataset=../escape"], "--dataset must be a folder name"),
    "dataset that is hidden": (["--input={good}", "--dataset=.hidden"], "not '.hidden'"),
    "dataset with a slash": (["--input={good}", "--dataset=a/b"], "not 'a/b'"),
    "dataset with a space": (["--input={good}", "--dataset=my data"], "not 'my data'"),
    "dataset too long": (["--input={good}", f"--dataset={'x' * 201}"], "at most 200"),
    "input with no dataset": (["--input={good}", "--dataset="], "--input needs --dataset=NAME"),
    "unknown encoding": (["--input={good}", "--encoding=no_such_encoding"],
                         "cannot load tiktoken encoding 'no_such_encoding'"),
    "bundled size that is not a power of two": (["--input={good}", "--encoding=cl100k_5000"],
                                                "cannot load tiktoken encoding 'cl100k_5000'"),
    "oversized encoding": (["--input={good}", "--encoding=oversized"], "65,793 tokens, more than the 65,536"),
    "unknown hf stream": (["--hf=fineweb"], "--hf takes fineweb-edu+cosmopedia, fineweb-edu or cosmopedia"),
    "hf stream twice": (["--hf=cosmopedia+cosmopedia"], "not 'cosmopedia+cosmopedia'"),
    "hf dataset with no repo": (["--hf=cosmopedia", "--hf_cosmopedia=:cosmopedia-v2"], "--hf_cosmopedia must be"),
    "input and hf": (["--input={good}", "--hf=cosmopedia"], "--input and --hf exclude each other"),
    "input2 alone": (["--input2={good}"], "--input2 is the second stream"),
    "unknown key": (["--name=prev"], "unknown config key 'name'"),
    "misspelt key": (["--input={good}", "--datset=prev"], "did you mean 'dataset'"),
    "old-style flag": (["--input", "{good}"], "argument '--input' must be --key=value"),
    "missing config file": (["no_such_config.py"], "config file 'no_such_config.py' not found"),
    "empty path between commas": (["--input={good},,{other}"], "has an empty path"),
    "a file named twice": (["--input={good},{good}"], "good.jsonl is named twice (by --input and --input)"),
    "a file in both streams": (["--input={good}", "--input2={good}"], "named twice (by --input and --input2)"),
    "out_root that is a file": (["--input={good}", "--out_root={good}"], "--out_root {good} is a file"),
    "out_root inside a file": (["--input={good}", "--out_root={good}/data"], "cannot create --out_root"),
}


def bad_inputs(tmp_path, case):
    """(arguments, expected words in the error) for one kind of bad input."""
    good, other = tmp_path / "good.jsonl", tmp_path / "other.jsonl"
    good.write_text(json.dumps({"text": "fine\n"}) + "\n" + json.dumps({"text": "also fine\n"}) + "\n")
    other.write_text(json.dumps({"text": "other\n"}) + "\n" + json.dumps({"text": "more\n"}) + "\n")
    if case in REFUSED_SETTINGS:
        args, expected = REFUSED_SETTINGS[case]
        return [arg.format(good=good, other=other) for arg in args], expected.format(good=good)
    if case == "missing":
        return [f"--input={tmp_path / 'nope.txt'}"], "input not found"
    if case == "a path with a comma":
        (tmp_path / "a,b.txt").write_text("text\n")
        return [f"--input={tmp_path / 'a,b.txt'}"], "write ? for each comma"
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        return [f"--input={tmp_path / 'empty.txt'}"], "no text"
    if case == "no usable files":
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "notes.csv").write_text("a,b\n")
        return [f"--input={tmp_path / 'dir'}"], "holds no .txt"
    if case == "glob matches nothing":
        return [f"--input={tmp_path / '*.jsonl.gz'}"], "no file matches"
    if case == "a broken link in a folder":
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "gone.txt").symlink_to(tmp_path / "deleted.txt")
        return [f"--input={good},{tmp_path / 'dir'}"], f"cannot read {tmp_path / 'dir' / 'gone.txt'}"
    if case == "not gzip":
        (tmp_path / "plain.jsonl.gz").write_text(good.read_text())
        return [f"--input={good},{tmp_path / 'plain.jsonl.gz'}"], "plain.jsonl.gz is not gzip-compressed"
    if case == "truncated gzip":  # found when it is read
        (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(shakespeare_text()[:100_000].encode())[:20_000])
        return [f"--input={tmp_path / 'cut.txt.gz'}"], f"cannot read {tmp_path / 'cut.txt.gz'}"
    if case == "parquet without the text column":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "body.parquet")
        return [f"--input={good},{tmp_path / 'body.parquet'}"], "body.parquet: no 'text' column (it has body)"
    if case == "not parquet":
        pytest.importorskip("pyarrow")
        (tmp_path / "fake.parquet").write_text("not parquet")
        return [f"--input={good},{tmp_path / 'fake.parquet'}"], "fake.parquet: not a readable parquet file"
    if case == "not json":  # fails mid-way: the first shard, longer than a worker batch, is already written
        (tmp_path / "shards").mkdir()
        text = shakespeare_text()
        (tmp_path / "shards" / "a.jsonl").write_text(
            "".join(json.dumps({"text": text[i:i + 5000]}) + "\n" for i in range(0, 600_000, 5000)))
        (tmp_path / "shards" / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
        return [f"--input={tmp_path / 'shards'}", "--workers=1"], f"{tmp_path / 'shards' / 'b.jsonl'}:2: not JSON"
    if case in ("json number past its limit", "json nested too deep"):  # json raises ValueError, RecursionError
        value = "1" * 5000 if case == "json number past its limit" else "[" * 100_000 + "]" * 100_000
        other.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "a", "x": ' + value + "}\n")
        return [f"--input={good},{other}"], f"{other}:2: not JSON ("
    if case == "no text field":
        other.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
        return [f"--input={good},{other}"], f"{other}:2: the record has no 'text'"
    if case == "text not a string":
        other.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 12}) + "\n")
        return [f"--input={good},{other}"], f"{other}:2: 'text' is int, not a string"
    if case == "one document":
        (tmp_path / "short.txt").write_text("one paragraph\n\nand another, but short\n")
        return [f"--input={tmp_path / 'short.txt'}"], "single document"
    if case == "dataset folder that is a link":
        (tmp_path / "target").mkdir()
        (tmp_path / "linked").mkdir()
        (tmp_path / "linked" / "ds").symlink_to(tmp_path / "target")
        return [f"--input={good}", f"--out_root={tmp_path / 'linked'}", "--dataset=ds"], "is a symbolic link"


FILE_ERRORS = ["missing", "a path with a comma", "empty", "no usable files", "glob matches nothing",
               "a broken link in a folder", "not gzip", "truncated gzip", "parquet without the text column",
               "not parquet", "not json", "json number past its limit", "json nested too deep", "no text field",
               "text not a string", "one document", "dataset folder that is a link"]


@pytest.mark.parametrize("case", [*REFUSED_SETTINGS, *FILE_ERRORS])
def test_bad_input_is_one_clear_error_and_leaves_data_intact(tmp_path, previous, case):
    args, expected = bad_inputs(tmp_path, case)
    env = None
    if case == "oversized encoding":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin_path(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = run_prepare(previous[0], "--dataset=prev", "--overwrite=True", *args, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert_untouched(previous)


def test_help_shows_each_value_after_the_config_files_and_lists_the_encodings(tmp_path):
    (tmp_path / "mine.py").write_text("dataset = 'mine'\ninput = 'web/,books.parquet'\n")
    result = run_prepare(tmp_path, tmp_path / "mine.py", "--workers=3", "--help")
    assert result.returncode == 0 and not os.path.exists(tmp_path / "mine")
    assert "--dataset='mine'" in result.stdout and "--input='web/,books.parquet'" in result.stdout
    assert "--workers=3" in result.stdout and "tokenizer processes" in result.stdout
    assert all(name in result.stdout for name in tokenizer.BUNDLED)


def test_a_config_file_sets_what_the_flags_would(tmp_path, shakespeare_file):
    (tmp_path / "shakespeare.py").write_text(f"input = {str(shakespeare_file)!r}\ndataset = 'from_file'\n"
                                             f"encoding = 'bytes'\nval_fraction = 0.2\n")
    prepared(tmp_path, tmp_path / "shakespeare.py", "--workers=1")
    meta, _ = load(tmp_path / "from_file")
    assert (meta["encoding"], meta["val_fraction"], meta["source"]) == ("bytes", 0.2, [str(shakespeare_file)])


def test_hf_without_datasets_says_how_to_install_it(tmp_path):
    if importlib.util.find_spec("datasets"):
        pytest.skip("datasets is installed: --hf would go to the network")
    result = run_prepare(tmp_path, "--hf=fineweb-edu+cosmopedia")
    assert result.returncode != 0 and "pip install datasets" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "fineweb_edu_cosmopedia")


def test_a_hub_stream_that_fails_midway_is_one_line_naming_where():
    def dropped_connection():
        yield {"text": "one"}
        yield {"text": "two"}
        raise ConnectionError("Connection reset by peer\nand more lines")

    records = prepare.hf_records("org/corpus:cfg", dropped_connection())
    assert [next(records), next(records)] == [(1, {"text": "one"}), (2, {"text": "two"})]
    with pytest.raises(prepare.PrepareError, match="^streaming org/corpus:cfg failed after 2 records: "
                                                   "Connection reset by peer$"):
        next(records)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    paragraphs = shakespeare_text()[:60_000].split("\n\n")
    paragraphs[3] += " caf\xe9 na\xefve"
    paragraphs[40] += " \xa9 1623"
    raw = "\n\n".join(paragraphs).encode("latin-1")  # three bytes that are not UTF-8
    (tmp_path / "latin1.txt").write_bytes(raw)
    result = prepared(tmp_path, f"--input={tmp_path / 'latin1.txt'}", "--dataset=l", "--doc_chars=2000")
    assert "not valid UTF-8: replaced 3 invalid byte sequences" in result.stderr
    meta, tokens = load(tmp_path / "l")
    train_docs, val_docs = documents(tokens["train"], meta), documents(tokens["val"], meta)
    assert_cut_from([raw.decode("utf-8", errors="replace")], train_docs, val_docs)
    assert "".join(train_docs + val_docs).count("\ufffd") == 3


def test_lone_surrogates_in_json_are_replaced_and_counted(tmp_path):
    texts = ["a lone \ud800 and a pair \U0001F642", "second", "third \udfff"]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # \\ud800 escapes
    result = prepared(tmp_path, f"--input={tmp_path / 's.jsonl'}", "--dataset=s", "--encoding=bytes")
    assert "holds lone UTF-16 surrogates: replaced 2 with U+FFFD" in result.stderr
    meta, tokens = load(tmp_path / "s")
    docs = documents(tokens["train"], meta) + documents(tokens["val"], meta)
    assert sorted(docs) == sorted(["a lone \ufffd and a pair \U0001F642", "second", "third \ufffd"])


def test_records_with_a_null_text_are_skipped_and_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [None if i % 7 == 3 else text for i, text in enumerate(shakespeare_text()[:60_000].split("\n\n"))]
    kept = [text for text in texts if text is not None]
    (tmp_path / "nulls.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    pq.write_table(pa.table({"text": texts}), tmp_path / "nulls.parquet")
    for name in ("nulls.jsonl", "nulls.parquet", "kept.jsonl"):
        result = run_tool("prepare", [f"--input={tmp_path / name}", f"--dataset={name.replace('.', '_')}",
                                      "--encoding=bytes", "--workers=1", f"--out_root={tmp_path}"])
        assert result.returncode == 0, result.stderr
        count = f"{tmp_path / name}: skipped the records whose 'text' is null ({len(texts) - len(kept):,})"
        assert (count in result.stderr) == name.startswith("nulls")
    for split in ("train", "val"):  # the same files as with those records left out
        expected = (tmp_path / "kept_jsonl" / f"{split}.bin").read_bytes()
        assert (tmp_path / "nulls_jsonl" / f"{split}.bin").read_bytes() == expected
        assert (tmp_path / "nulls_parquet" / f"{split}.bin").read_bytes() == expected


def test_a_file_with_no_line_breaks_is_cut_after_spaces_into_documents(tmp_path):
    text = " ".join(shakespeare_text().split())  # text8's shape: one line of words
    (tmp_path / "oneline.txt").write_text(text)
    prepared(tmp_path, f"--input={tmp_path / 'oneline.txt'}", "--dataset=o", "--encoding=bytes", "--doc_chars=1000")
    meta, tokens = load(tmp_path / "o")
    train_docs, val_docs = documents(tokens["train"], meta), documents(tokens["val"], meta)
    assert_cut_from([text], train_docs, val_docs)  # every character kept, in order
    assert len(train_docs + val_docs) > 50 and val_docs
    assert all(doc.endswith(" ") and len(doc) <= 2 * 8 * 1000
               for doc in train_docs + val_docs if doc != text[-len(doc):])


def test_long_lines_come_in_pieces_cut_after_a_space_or_between_characters():
    line = "ab 日本語 🙂 " * 50 + "x" * 100 + "é" * 100 + "\n" + "short\n" + "🙂" * 30
    pieces = list(prepare.line_pieces(io.BytesIO(line.encode()), max_bytes=64))
    assert b"".join(pieces) == line.encode()
    assert all(len(piece) <= 64 for piece in pieces)
    texts = [piece.decode("utf-8") for piece in pieces]  # each one whole characters
    assert texts[0].endswith(" ") and "short\n" in texts


def test_a_very_long_run_of_spaces_is_encoded_exactly_and_other_text_as_before(monkeypatch):
    enc = tokenizer.get_encoding("cl100k_4096")
    spaces = "a" + " " * 1_000_000 + "b\n" + " \t" * 300_000 + "end"  # tiktoken's own regex overflows on these
    assert enc.decode(prepare.encode_text(enc, spaces)) == spaces
    text = shakespeare_text()[:300_000]  # long, but without such a run: encoded whole
    assert prepare.encode_text(enc, text) == enc.encode_ordinary(text)
    monkeypatch.setattr(prepare, "SPACE_PIECE", 10 ** 7)  # as if the pieces were too long: the panic itself
    failed = "tiktoken failed on a document of 1,000,002 characters beginning 'a "
    with pytest.raises(prepare.PrepareError, match=failed):
        prepare.encode_batch("cl100k_4096", 0, ["a" + " " * 1_000_000 + "b"])


def test_an_input_kept_in_the_dataset_folder_is_refused_not_deleted(tmp_path, shakespeare_file):
    """nanoGPT's layout, data/NAME/input.txt: the swap replaces data/NAME whole, input and all."""
    folder = tmp_path / "data" / "mine"
    folder.mkdir(parents=True)
    shutil.copy(shakespeare_file, folder / "input.txt")
    result = run_prepare(tmp_path / "data", f"--input={folder / 'input.txt'}", "--dataset=mine", "--encoding=bytes")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"{folder} holds input.txt, which prepare.py did not write" in result.stderr
    assert os.listdir(folder) == ["input.txt"]
    (folder / "input.txt").rename(tmp_path / "input.txt")
    for _ in range(2):  # and a rerun replaces what an earlier run wrote
        prepared(tmp_path / "data", f"--input={tmp_path / 'input.txt'}", "--dataset=mine", "--encoding=bytes")
    assert sorted(os.listdir(folder)) == ["meta.json", "train.bin", "val.bin"]


def test_linked_folders_are_read_once_and_odd_paths_work(tmp_path):
    """A folder linked from the input tree is read (once, even in a cycle); a file whose name holds glob
    characters can be named as it is; an out_root whose path holds '.tmp-' takes a rerun; a .jsonl file
    may start with a byte-order mark."""
    records = lambda name: "".join(json.dumps({"text": f"{name} {i}\n"}) + "\n" for i in range(10))
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "c.jsonl").write_text(records("linked"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.jsonl").write_text("\ufeff" + records("own"))  # and a byte-order mark is no text
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus")
    (tmp_path / "part[1].jsonl").write_text(records("bracketed"))
    root = tmp_path / "my.tmp-root"
    for _ in range(2):
        prepared(root, f"--input={tmp_path / 'corpus'},{tmp_path / 'part[1].jsonl'}", "--dataset=d")
    meta, tokens = load(root / "d")
    assert meta["source"] == [str(tmp_path / "corpus" / "b.jsonl"), str(tmp_path / "corpus" / "linked" / "c.jsonl"),
                              str(tmp_path / "part[1].jsonl")]
    docs = documents(tokens["train"], meta) + documents(tokens["val"], meta)
    assert sorted(docs) == sorted(f"{name} {i}\n" for name in ("own", "linked", "bracketed") for i in range(10))


def start_on_a_pipe(tmp_path, out_root, *args, chars=300_000):
    """prepare.py reading a named pipe, and the pipe's open writing end after `chars` characters: the run
    then waits mid-way, its temp dir in place, for text that comes only when the test says."""
    fifo = tmp_path / "slow.txt"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "prepare.py", f"--input={fifo}", "--dataset=prev", "--overwrite=True",
                                f"--out_root={out_root}", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    pipe = open(fifo, "w")
    pipe.write((shakespeare_text() * (1 + chars // len(shakespeare_text())))[:chars])
    pipe.flush()
    return process, pipe


def wait_for(condition, what):
    deadline = time.time() + 60
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_mid_run_leaves_previous_data_intact(tmp_path, previous, signum, code, word):
    process, pipe = start_on_a_pipe(tmp_path, previous[0])
    with pipe:
        wait_for(lambda: glob.glob(str(previous[0] / ".prev.tmp-*" / "train.bin")), "the temp dir")
        time.sleep(0.5)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr.strip() == f"{word}: {previous[0] / 'prev'} is left as it was"
    assert_untouched(previous)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command's name: [0] the state (R: running), [1] the parent,
    [11] and [12] the user and system CPU time in clock ticks; None for a process that has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # ended, or ending as it was read
        return None


def worker_processes(pid):
    """The processes forked by pid that run prepare.py (its tokenizer pool), from /proc."""
    found = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        child = int(stat_file.split("/")[2])
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # a process that ended meanwhile
            continue
        fields = proc_stat(child)
        if fields is not None and int(fields[1]) == pid and b"prepare.py" in command:
            found.append(child)
    return found


def kill_while_answering(process):
    """Every tokenizer process killed while its answer, if any, finds nobody reading: the parent is stopped
    once the pool has done some work (a batch takes a tokenizer process about 20 ms here, too short to be
    caught at work by polling, so the test sends a dozen batches and waits for their CPU time) and let go
    after the kills."""
    def tokenizing():
        workers = [proc_stat(w) for w in worker_processes(process.pid)]
        return any(f is not None and (f[0] == "R" or int(f[11]) + int(f[12]) >= 3) for f in workers)

    def running(worker):
        fields = proc_stat(worker)
        return fields is not None and fields[0] == "R"

    wait_for(tokenizing, "a tokenizer process at work")
    os.kill(process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not any(map(running, worker_processes(process.pid))), "the batch done")
        for worker in worker_processes(process.pid):
            os.kill(worker, signal.SIGKILL)
    finally:
        os.kill(process.pid, signal.SIGCONT)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.isdir("/proc/self"), reason="needs a named pipe and /proc")
@pytest.mark.parametrize("when", ["idle", "answering"])
def test_a_tokenizer_process_that_dies_is_an_error_not_a_hang(tmp_path, previous, when):
    process, pipe = start_on_a_pipe(tmp_path, previous[0], "--workers=2",
                                    chars=300_000 if when == "idle" else 3_000_000)
    with pipe:
        if when == "idle":
            wait_for(lambda: worker_processes(process.pid), "a tokenizer process")
            os.kill(worker_processes(process.pid)[0], signal.SIGKILL)  # as the out-of-memory killer would
        else:
            kill_while_answering(process)
    try:
        _, stderr = process.communicate(timeout=60)  # the pipe is closed: the run reads to its end
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines() == ["error: a tokenizer process died (killed, or out of memory?); try fewer "
                                           "--workers than 2"]
    assert_untouched(previous)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("workers", [1, 2])  # with 2, a tokenizer process's batch file is what fails too
def test_a_full_disk_mid_run_is_one_line_and_leaves_previous_data_intact(previous, workers):
    result = subprocess.run([sys.executable, "prepare.py", f"--input={SHAKESPEARE}", "--dataset=prev",
                             "--overwrite=True", "--encoding=bytes", f"--out_root={previous[0]}",
                             f"--workers={workers}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            preexec_fn=limited_file_size(200_000))
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"error: cannot write {previous[0] / 'prev'}: [Errno 27] File too large"
    assert "Traceback" not in result.stderr
    assert_untouched(previous)


def test_a_signal_during_the_swap_waits_until_it_is_done(capsys):
    with prepare.signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # would be a KeyboardInterrupt between the swap's two renames
        time.sleep(0.1)
    assert "SIGINT came while the new data was swapped in" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def prepare_here(*args):
    """prepare.py in this process (run_tool): (exit code, stderr)."""
    result = run_tool("prepare", ["--workers=1", *map(str, args)])
    return result.returncode, result.stderr


def test_a_byte_order_mark_is_dropped_and_windows_line_ends_are_reported(tmp_path):
    text = shakespeare_text()[:40_000]
    (tmp_path / "win.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    code, stderr = prepare_here(f"--input={tmp_path / 'win.txt'}", "--dataset=win", "--encoding=bytes",
                                f"--out_root={tmp_path}", "--doc_chars=2000")
    assert code == 0, stderr
    assert f"note: {tmp_path / 'win.txt'} starts with a UTF-8 byte-order mark (U+FEFF): dropped it" in stderr
    assert f"has Windows line ends (CRLF) on {text.count(chr(10)):,} lines" in stderr  # every line, blank ones too
    meta, tokens = load(tmp_path / "win")
    written = "".join(documents(tokens["train"], meta) + documents(tokens["val"], meta))
    assert "\ufeff" not in written and "\r\n" in written  # the mark is gone; the line ends are as they were


def test_a_dataset_of_other_input_or_settings_is_replaced_only_with_overwrite(tmp_path, shakespeare_file):
    args = [f"--input={shakespeare_file}", "--dataset=d", f"--out_root={tmp_path}"]
    assert prepare_here(*args, "--encoding=bytes")[0] == 0
    first = {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")}
    assert prepare_here(*args, "--encoding=bytes")[0] == 0  # the same input again: an identical rewrite
    assert {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")} == first
    code, stderr = prepare_here(*args)  # the default encoding, as the README's example once did
    assert code == 1 and stderr.strip().splitlines() == [
        f"error: {tmp_path / 'd'} holds a dataset of other encoding, vocab_size (encoding: 'bytes' there, "
        f"'cl100k_65536' now): pass --overwrite=True to replace it, or choose another --dataset"]
    code, stderr = prepare_here(*args, "--encoding=bytes", "--test_fraction=0.1")
    assert code == 1 and "other test_fraction" in stderr
    assert {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")} == first
    assert prepare_here(*args, "--overwrite=True")[0] == 0
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["encoding"] == "cl100k_65536"


def test_a_split_much_larger_than_its_share_says_how_to_cut_more_documents(tmp_path):
    (tmp_path / "small.txt").write_text(shakespeare_text()[:8000])  # 8 KB: a few documents of 4,000 characters
    code, stderr = prepare_here(f"--input={tmp_path / 'small.txt'}", "--dataset=s", "--encoding=bytes",
                                f"--out_root={tmp_path}")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    share = meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert code == 0 and share > 0.2
    assert f"note: val holds {share:.0%} of the tokens, for --val_fraction=0.1" in stderr
    assert "lower --doc_chars (now 4,000)" in stderr
    code, stderr = prepare_here(f"--input={tmp_path / 'small.txt'}", "--dataset=s2", "--encoding=bytes",
                                f"--out_root={tmp_path}", "--doc_chars=200")
    assert code == 0 and "holds" not in stderr


def test_check_finds_a_changed_token_file_and_records_the_sha256_of_an_older_dataset_keeping_its_data_hash(
        tmp_path, shakespeare_file):
    """A dataset made before prepare.py recorded the sha256 still trains, with a note saying how to record
    them; recording them leaves its data_hash (in every results row) as it was. A byte changed in val.bin,
    its size kept, is found by --check=True and by sweep.py, each in one line."""
    prepared(tmp_path, f"--input={shakespeare_file}", "--dataset=d", "--encoding=bytes")
    folder, written = tmp_path / "d", (tmp_path / "d" / "meta.json").read_text()
    hashed = common.data_hash(str(folder))
    digests = common.check_token_files(str(folder), json.loads(written), hashes=True)
    assert set(digests) == {"train", "val"} and common.data_hash(str(folder), digests) == hashed  # sweep.py's way
    assert prepared(tmp_path, "--check=True", "--dataset=d").stdout == \
        f"{folder}: train.bin, val.bin match meta.json (sizes and sha256)\n"
    older = {key: value for key, value in json.loads(written).items() if key != "sha256"}
    (folder / "meta.json").write_text(json.dumps(older, indent=2) + "\n")  # as prepare.py wrote it before
    assert common.data_hash(str(folder)) == hashed

    trained = run_tool("train", [f"--dataset={folder}", f"--out_dir={tmp_path / 'run'}", *TINY_MODEL,
                                 "--max_iters=0", "--eval_iters=1", "--batch_size=2"])
    assert trained.returncode == 0, trained.stderr
    note = next(line for line in trained.stderr.splitlines() if "records no sha256" in line)
    command = shlex.split(note.split("to record them: ")[1])
    assert command[:2] == ["python", "prepare.py"]
    recorded = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert recorded.returncode == 0 and "recorded their sha256 in it (its data_hash is unchanged)" in recorded.stdout
    assert (folder / "meta.json").read_text() == written and common.data_hash(str(folder)) == hashed

    val = bytearray((folder / "val.bin").read_bytes())
    val[1000] ^= 1
    (folder / "val.bin").write_bytes(val)
    refused = f"{folder / 'val.bin'} does not match the sha256 that meta.json records for it: the file changed after " \
              f"prepare.py wrote it; run prepare.py for '{folder}' again (--overwrite=True)"
    result = run_prepare(tmp_path, "--check=True", "--dataset=d")
    assert (result.returncode, result.stderr) == (1, f"error: {refused}\n")
    (tmp_path / "study.py").write_text(f"base = {{'n_layer': 1}}\ngrid = {{'input_code': ['learned'], 'seed': [1]}}\n"
                                       f"dataset = {str(folder)!r}\nresults = {str(tmp_path / 'r.jsonl')!r}\n"
                                       f"runs_dir = {str(tmp_path / 'runs')!r}\n")
    result = run_tool("sweep", [str(tmp_path / "study.py")])
    assert (result.returncode, result.stderr.splitlines()[-1]) == (1, f"error: {refused}")
    assert not (tmp_path / "runs").exists()
