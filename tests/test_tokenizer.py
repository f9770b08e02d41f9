"""tokenizer.py: the bundled V = 65,536 encoding and 'bytes', offline, on real text; what is refused."""
import os
import subprocess
import sys

import pytest
import tiktoken

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
    pieces = [enc.decode_single_token_bytes(i) for i in range(65535)]
    assert all(pieces) and len(set(pieces)) == 65535  # every id below eot is a distinct, non-empty token
    with open(tokenizer.BUNDLED_FILE, "rb") as f:
        ranks = [int(line.split()[1]) for line in f]
    assert ranks == list(range(65535))


@pytest.mark.parametrize("name", ["cl100k_65536", "bytes"])
def test_round_trip_on_real_text(name):
    enc = tokenizer.get_encoding(name)
    text = real_text()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert max(ids) < enc.eot_token
    assert enc.eot_token not in enc.encode_ordinary("a literal <|endoftext|> is text")


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


def test_unknown_encoding_names_the_offline_choices():
    with pytest.raises(ValueError, match="cannot load tiktoken encoding 'no_such_encoding'.*cl100k_65536"):
        tokenizer.get_encoding("no_such_encoding")


def test_derive_script_refuses_a_file_that_is_not_cl100k_base(tmp_path):
    out = tmp_path / "derived.tiktoken"
    result = subprocess.run([sys.executable, "assets/derive_tokenizer.py", "--source", tokenizer.BUNDLED_FILE,
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "expected 223921b7" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
