"""Token encodings, all loaded offline as tiktoken Encodings.

- 'cl100k_65536' (the default): the first 65,535 merge ranks of cl100k_base plus <|endoftext|> = 65535,
  read from assets/cl100k_base_65536.tiktoken. V = 65,536 = 2^16, the paper's vocabulary: K = 16.
- 'cl100k_V' for V = 512, 1024, ..., 32768: the first V - 1 merge ranks of that same file plus
  <|endoftext|> = V - 1, so V = 2^K and every K-bit code is a token (e.g. cl100k_4096: K = 12). BPE
  merges in rank order and every cl100k token of rank r is two tokens of lower rank, so keeping ranks
  0..V-2 is exactly cl100k_base's BPE stopped after its first V - 257 merges. Ranks 0..255 are the
  256 single bytes, so any text encodes; 512 is the smallest power of two above them.
- 'bytes': the 256 byte values plus <|endoftext|> = 256. V = 257, K = 9; the fast path on a CPU.
- any other tiktoken name (e.g. 'gpt2'), when this machine can load it (tiktoken downloads those
  files on first use and caches them).
Token files are uint16, so an encoding with more than 65,536 ids is refused.

Prompts are encoded by encode_prompt (the literal <|endoftext|> is the document boundary), and
generated tokens become text through TextStream, which holds back a character until all its bytes
have arrived.

    python -c "import tokenizer; e = tokenizer.get_encoding('cl100k_4096'); print(e.n_vocab, e.encode('Hello'))"
"""
import base64
import codecs
import functools
import os

import tiktoken

from common import first_line

DEFAULT_ENCODING = "cl100k_65536"
MAX_VOCAB = 2 ** 16  # token ids are stored as uint16
BUNDLED = {f"cl100k_{2 ** k}": 2 ** k for k in range(9, 17)}  # name: V, from cl100k_512 to cl100k_65536
ENDOFTEXT = "<|endoftext|>"
BUNDLED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "cl100k_base_65536.tiktoken")
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


@functools.lru_cache(maxsize=1)
def _bundled_ranks():
    """The asset's "base64-token rank" lines, read here: tiktoken's loader would keep a copy in its cache
    keyed by the path and read that copy ever after, even once the file at the path has changed."""
    with open(BUNDLED_FILE, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def _bundled(name):
    vocab_size = BUNDLED[name]
    ranks = {token: rank for token, rank in _bundled_ranks().items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name, pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: vocab_size - 1})


def _bytes():
    # With single bytes as the only ranks no merge ever applies; the pattern only chunks the text.
    return tiktoken.Encoding("bytes", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={ENDOFTEXT: 256})


@functools.lru_cache(maxsize=None)
def get_encoding(name=DEFAULT_ENCODING):
    """The tiktoken Encoding called `name`; ValueError with a one-line reason when it cannot be used."""
    if name in BUNDLED:
        enc = _bundled(name)
    elif name == "bytes":
        enc = _bytes()
    else:
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # unknown name, or no network to fetch its BPE file
            raise ValueError(f"cannot load tiktoken encoding '{name}' ({first_line(e)}); offline, use one of "
                             f"{', '.join(BUNDLED)} (bundled) or 'bytes'") from None
    check_encoding(enc)
    return enc


def check_encoding(enc):
    """Refuse an encoding that cannot be stored in uint16 token files, has no document separator, or
    cannot encode every text (a byte value that is not a token of its own)."""
    name = enc.name
    if enc.n_vocab > MAX_VOCAB:
        raise ValueError(f"encoding '{name}' has {enc.n_vocab:,} tokens, more than the {MAX_VOCAB:,} that uint16 "
                         f"token files hold; use 'cl100k_65536' or 'bytes'")
    if ENDOFTEXT not in enc.special_tokens_set:
        raise ValueError(f"encoding '{name}' has no {ENDOFTEXT} token to separate documents")
    missing = [b for b in range(256) if not _is_token(enc, bytes([b]))]
    if missing:
        raise ValueError(f"encoding '{name}' lacks {len(missing)} of the 256 single-byte tokens (e.g. byte "
                         f"{missing[0]}), so some text cannot be encoded")


def _is_token(enc, piece):
    try:
        enc.encode_single_token(piece)
    except KeyError:
        return False
    return True


def token_bytes(encoding):
    """Each id's bytes, id 0 to n_vocab - 1; b'' for the special tokens (<|endoftext|>): they are no text."""
    special = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    return [b"" if t in special else encoding.decode_single_token_bytes(t) for t in range(encoding.n_vocab)]


def encode_prompt(encoding, text):
    """Token ids of text, reading the literal <|endoftext|> as the document boundary; [eot] for ''."""
    return encoding.encode(text, allowed_special={ENDOFTEXT}) or [encoding.eot_token]


class TextStream:
    """Token ids in, text out as soon as it is final: a character is released once all its bytes have
    arrived (a byte token or a BPE token may hold part of one); finish() turns bytes still pending
    into U+FFFD."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token):
        return self.decoder.decode(self.encoding.decode_single_token_bytes(token))

    def finish(self):
        return self.decoder.decode(b"", final=True)
