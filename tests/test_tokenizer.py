"""tokenizer.py: the bundled cl100k_V encodings (V = 512 .. 65,536) and 'bytes', offline, on real text;
that a truncated cl100k is exactly BPE with cl100k's first merges; what is refused."""
import os
import subprocess
import sys

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

import tokenizer
from conftest import shakespeare_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNICODE = "naïve café, «quoted» — 日本語 🙂\n"


def real_text():
    from pydoc_data.topics import topics
    return shakespeare_text() + UNICODE + "\n\n".join(topics[name] for name in sorted(topics))


def test_bundled_encoding_is_the_paper_vocabulary():
    enc = tokenizer.get_encoding()
    assert enc.name == "cl100k_65536" and enc.n_vocab == 65536 == 2 ** 16 and enc.eot_token == 65535
    with open(tokenizer.BUNDLED_FILE, "rb") as f:
        ranks = [int(line.split()[1]) for line in f]
    assert ranks == list(range(65535))


@pytest.mark.parametrize("name", tokenizer.BUNDLED)
def test_every_bundled_size_is_a_power_of_two_of_distinct_tokens(name):
    enc = tokenizer.get_encoding(name)
    vocab_size = int(name.removeprefix("cl100k_"))
    assert enc.n_vocab == vocab_size == 2 ** (vocab_size.bit_length() - 1) and enc.eot_token == vocab_size - 1
    pieces = [enc.decode_single_token_bytes(i) for i in range(vocab_size - 1)]
    assert all(pieces) and len(set(pieces)) == vocab_size - 1  # every id below eot is a distinct, non-empty token
    assert set(pieces[:256]) == {bytes([b]) for b in range(256)}  # ranks 0..255 are the single bytes: any text encodes
    full = tokenizer.get_encoding("cl100k_65536")
    assert all(full.encode_single_token(piece) == i for i, piece in enumerate(pieces))  # a prefix of the same ranks


def test_every_cl100k_token_is_a_merge_of_two_lower_ranked_tokens():
    """So keeping ranks 0..V-2 keeps every merge needed to build each kept token: BPE stopped early."""
    ranks = load_tiktoken_bpe(tokenizer.BUNDLED_FILE)
    for token, rank in ranks.items():
        assert len(token) == 1 or any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                                      for i in range(1, len(token))), token


def reference_bpe(piece, ranks):
    """Plain BPE on one pre-tokenized piece: merge the adjacent pair of lowest rank until no pair is a token."""
    parts = [bytes([b]) for b in piece]
    while True:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not pairs:
            return [ranks[part] for part in parts]
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@pytest.mark.parametrize("name", ["cl100k_512", "cl100k_4096", "cl100k_8192"])
def test_truncated_cl100k_is_exactly_bpe_with_its_first_merges(name):
    enc = tokenizer.get_encoding(name)
    kept = {token: rank for token, rank in load_tiktoken_bpe(tokenizer.BUNDLED_FILE).items() if rank < enc.eot_token}
    text = real_text()
    text = text[:30_000] + UNICODE + text[-30_000:]
    pieces = regex.findall(tokenizer.CL100K_PATTERN, text)  # tiktoken's pre-tokenization, then BPE within each piece
    expected = [rank for piece in pieces for rank in reference_bpe(piece.encode(), kept)]
    assert enc.encode_ordinary(text) == expected


@pytest.mark.parametrize("name", [*tokenizer.BUNDLED, "bytes"])
def test_round_trip_on_real_text(name):
    enc = tokenizer.get_encoding(name)
    text = real_text()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert max(ids) < enc.eot_token
    assert enc.eot_token not in enc.encode_ordinary("a literal <|endoftext|> is text")


def test_any_code_point_round_trips_in_the_smallest_encoding():
    enc = tokenizer.get_encoding("cl100k_512")
    text = "".join(chr(c) for c in range(1, 0x11000, 7) if not 0xD800 <= c < 0xE000)  # no lone surrogates
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_bytes_encoding_is_one_token_per_utf8_byte():
    enc = tokenizer.get_encoding("bytes")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    text = shakespeare_text()[:20_000] + UNICODE
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))


def test_encodings_that_do_not_fit_uint16_files_are_refused():
    ranks = {bytes([i]): i for i in range(256)}
    for pair in range(65536):
        ranks.setdefault(pair.to_bytes(2, "big"), len(ranks))
    oversized = tiktoken.Encoding("oversized", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                  special_tokens={tokenizer.ENDOFTEXT: len(ranks)})
    with pytest.raises(ValueError, match="65,793 tokens, more than the 65,536"):
        tokenizer.check_encoding(oversized)
    no_separator = tiktoken.Encoding("no_eot", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                     special_tokens={})
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token"):
        tokenizer.check_encoding(no_separator)
    no_byte_255 = tiktoken.Encoding("no_ff", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(255)},
                                    special_tokens={tokenizer.ENDOFTEXT: 255})
    with pytest.raises(ValueError, match="lacks 1 of the 256 single-byte tokens \\(e.g. byte 255\\)"):
        tokenizer.check_encoding(no_byte_255)


@pytest.mark.parametrize("name", ["no_such_encoding", "cl100k_5000", "cl100k_256"])
def test_unknown_encoding_names_the_offline_choices(name):
    with pytest.raises(ValueError, match=f"cannot load tiktoken encoding '{name}'.*cl100k_512, .*cl100k_65536"):
        tokenizer.get_encoding(name)


def test_derive_script_refuses_a_file_that_is_not_cl100k_base(tmp_path):
    out = tmp_path / "derived.tiktoken"
    result = subprocess.run([sys.executable, "assets/derive_tokenizer.py", "--source", tokenizer.BUNDLED_FILE,
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "expected 223921b7" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_the_bundled_file_is_read_where_it_is_not_from_a_cache(tmp_path):
    """tiktoken's loader copies a local file into TIKTOKEN_CACHE_DIR and reads that copy ever after:
    an edited or truncated copy there would change the vocabulary with nothing to say so."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    code = "import tokenizer; e = tokenizer.get_encoding('cl100k_65536'); print(e.n_vocab, e.encode('Hello world'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["65536", "[9906,", "1917]"]
    assert list(cache.iterdir()) == []  # nothing copied, so nothing to go stale
