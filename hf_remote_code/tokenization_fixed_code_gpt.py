"""
A transformers tokenizer over tiktoken, for folders written by export_hf.py (needs only tiktoken).

tokenizer.tiktoken holds the merge ranks, ids 0..V-2, in tiktoken's own file format; <|endoftext|>
is id V-1 and serves as end-of-text, beginning-of-text and padding token. Encoding and decoding are
tiktoken's: transformers sees each token as its bytes read as latin-1, one character per byte, so
that a token list joins back into exactly the bytes tiktoken would decode.
"""
import os
import shutil

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer

ENDOFTEXT = "<|endoftext|>"


class FixedCodeTiktokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.tiktoken"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, pat_str, **kwargs):
        ranks = load_tiktoken_bpe(vocab_file)
        self.encoding = tiktoken.Encoding("exported", pat_str=pat_str, mergeable_ranks=ranks,
                                          special_tokens={ENDOFTEXT: len(ranks)})
        self.vocab_file = vocab_file
        for role in ("eos_token", "bos_token", "pad_token"):
            kwargs.setdefault(role, ENDOFTEXT)
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # decode exactly what tiktoken decodes
        super().__init__(pat_str=pat_str, **kwargs)

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    def get_vocab(self):
        return {self._convert_id_to_token(i): i for i in range(self.encoding.n_vocab)}

    def _tokenize(self, text, **kwargs):  # text holds no special tokens: transformers splits them off first
        return [self._convert_id_to_token(i) for i in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token):  # <|endoftext|> included: tiktoken looks special tokens up too
        return self.encoding.encode_single_token(token.encode("latin-1"))

    def _convert_id_to_token(self, index):
        return self.encoding.decode_single_token_bytes(index).decode("latin-1")

    def convert_tokens_to_string(self, tokens):
        return b"".join(token.encode("latin-1") for token in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.tiktoken")
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, path)
        return (path,)
