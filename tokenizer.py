"""Token encodings, all loaded offline as tiktoken Encodings.

- 'cl100k_65536' (the default): the first 65,535 merge ranks of cl100k_base plus <|endoftext|> = 65535,
  read from assets/cl100k_base_65536.tiktoken. V = 65,536 = 2^16, the paper's vocabulary: K = 16.
- 'bytes': the 256 byte values plus <|endoftext|> = 256. V = 257, K = 9; the fast path on a CPU.
- any other tiktoken name (e.g. 'gpt2'), when this machine can load it (tiktoken downloads those
  files on first use and caches them).
Token files are uint16, so an encoding with more than 65,536 ids is refused.
"""
import functools
import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe

DEFAULT_ENCODING = "cl100k_65536"
MAX_VOCAB = 2 ** 16  # token ids are stored as uint16
ENDOFTEXT = "<|endoftext|>"
BUNDLED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "cl100k_base_65536.tiktoken")
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""


def _bundled():
    ranks = load_tiktoken_bpe(BUNDLED_FILE)
    return tiktoken.Encoding("cl100k_65536", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})


def _bytes():
    # With single bytes as the only ranks no merge ever applies; the pattern only chunks the text.
    return tiktoken.Encoding("bytes", pat_str=r"\s+|\S+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={ENDOFTEXT: 256})


@functools.lru_cache(maxsize=None)
def get_encoding(name=DEFAULT_ENCODING):
    """The tiktoken Encoding called `name`; ValueError with a one-line reason when it cannot be used."""
    if name == "cl100k_65536":
        enc = _bundled()
    elif name == "bytes":
        enc = _bytes()
    else:
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # unknown name, or no network to fetch its BPE file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot load tiktoken encoding '{name}' ({reason}); offline, use 'cl100k_65536' "
                             f"(bundled) or 'bytes'") from None
    check_encoding(enc)
    return enc


def check_encoding(enc):
    """Refuse an encoding that cannot be stored in uint16 token files or has no document separator."""
    name = enc.name
    if enc.n_vocab > MAX_VOCAB:
        raise ValueError(f"encoding '{name}' has {enc.n_vocab:,} tokens, more than the {MAX_VOCAB:,} that uint16 "
                         f"token files hold; use 'cl100k_65536' or 'bytes'")
    if ENDOFTEXT not in enc.special_tokens_set:
        raise ValueError(f"encoding '{name}' has no {ENDOFTEXT} token to separate documents")
