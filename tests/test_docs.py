"""The documents stay true: every command in a fenced block of README.md, BENCHMARKS.md and docs/ that
runs a script of this repository (`python X.py ...`, `torchrun ... X.py ...`) is parsed by that script's
own config parser, as the script itself calls it; every relative link and image exists. Nothing is
trained: a command is stopped as soon as its settings are parsed."""
import glob
import importlib
import itertools
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

DOCUMENTS = ["README.md", "BENCHMARKS.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}
KEYWORDS = {"do", "then", "else", "time", "!"}
WRAPPERS = {"/usr/bin/time": {"-f", "-o"}, "nohup": set()}  # a wrapper before the command, its options with a value
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


class Parsed(Exception):
    """Raised by the wrapped parse_config once a script's settings are parsed: nothing else runs."""

    def __init__(self, config):
        self.config = config


# --------------------------------------------------------------------------------- the commands

def fenced_blocks(path):
    """[(line number of the block's first line, [lines])] of the shell blocks in a markdown file: fenced
    blocks with no language or a shell one (a sample's output too: its lines run nothing), not python."""
    blocks, block, start = [], None, 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = re.match(r"\s*```(\S*)", line)
            if fence and block is None:
                block, start, language = [], number + 1, fence.group(1)
            elif fence:
                if language in ("", "sh", "bash", "shell", "console"):
                    blocks.append((start, block))
                block = None
            elif block is not None:
                block.append(line.rstrip("\n"))
    return blocks


def logical_lines(start, lines):
    """[(line number, text)] with backslash continuations joined and here-documents left out."""
    joined, first, parts, until = [], None, [], None
    for number, line in enumerate(lines, start):
        if until is not None:
            until = None if line.strip() == until else until
            continue
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)", line)
        until = heredoc.group(1) if heredoc else None
        first = first or number
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        joined.append((first, " ".join(parts + [line])))
        first, parts = None, []
    return joined


def segments(text):
    """The simple commands of one shell line, as lists of words (quotes removed, comments dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, current = [], []
    for token in lexer:
        if token in OPERATORS:
            words.append(current)
            current = []
        else:
            current.append(token)
    return [w for w in words + [current] if w]


def repository_commands(path):
    """[(line number, script, argv, processes)] of the fenced commands in path that run a script of this
    repository, with the shell variables of for loops and plain assignments expanded (one command per
    value); processes is torchrun's nnodes x nproc_per_node, else 1. A command after `cd` to another
    folder runs another repository's script and is left out."""
    found = []
    for start, lines in fenced_blocks(path):
        variables, loops = {}, []
        for number, text in logical_lines(start, lines):
            elsewhere = False
            for words in segments(text):
                while words and words[0] in KEYWORDS:
                    words = words[1:]
                if not words:
                    continue
                if words[0] == "for" and len(words) > 2 and words[2] == "in":
                    variables[words[1]] = words[3:]
                    loops.append(words[1])
                    continue
                if words[0] == "done":
                    if loops:
                        variables.pop(loops.pop(), None)
                    continue
                if words[0] == "cd":
                    elsewhere = words[1:] not in ([], ["."])
                    continue
                while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value, alone or before a command
                    name, value = words[0].split("=", 1)
                    if len(words) == 1:
                        variables[name] = [value]
                    words = words[1:]
                words = unwrapped(words)
                if words and not elsewhere:
                    found += [(number, *command) for command in script_commands(words, variables)]
    return found


def unwrapped(words):
    """The command a wrapper runs (`/usr/bin/time -f "%U %S" python ...`), or words as they are."""
    while words and words[0] in WRAPPERS:
        options, words = WRAPPERS[words[0]], words[1:]
        while words and words[0].startswith("-"):
            words = words[2:] if words[0] in options else words[1:]
    return words


def script_commands(words, variables):
    """[(script, argv, processes)] for a command that runs a repository script, per value of its variables."""
    processes = 1
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        script, argv = words[1], words[2:]
    elif words[0] == "torchrun":
        options = list(itertools.takewhile(lambda w: w.startswith("-"), words[1:]))
        rest = words[1 + len(options):]
        if not rest or not rest[0].endswith(".py"):
            return []
        script, argv = rest[0], rest[1:]
        counts = dict(o[2:].split("=", 1) for o in options if "=" in o)
        processes = int(counts.get("nnodes", 1)) * int(counts.get("nproc_per_node", 1))
    else:
        return []
    used = sorted({name for word in words for name in VARIABLE.findall(word) if name in variables})
    commands = []
    for values in itertools.product(*(variables[name] for name in used)):
        value = dict(zip(used, values))
        commands.append((expanded(script, value), [expanded(w, value) for w in argv], processes))
    return commands


def expanded(word, value):
    """word with each $NAME of value replaced; other variables ($OUT) stay as they are."""
    return VARIABLE.sub(lambda m: value.get(m.group(1), m.group(0)), word)


def parse_with_script(script, argv, monkeypatch):
    """The config that script's main parses from argv (its own parse_config call, stopped right after),
    or raise what the parser raised."""
    module = importlib.import_module(script.removesuffix(".py"))
    parse_config = module.parse_config

    def parsed_then_stop(*args, **kwargs):
        raise Parsed(parse_config(*args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(module, "parse_config", parsed_then_stop)
        patch.delenv("WORLD_SIZE", raising=False)  # torchrun's commands are parsed as one process would
        try:
            module.main(argv)
        except Parsed as done:
            return done.config
        except SystemExit as e:  # --help: the keys printed, exit 0
            if e.code == 0:
                return None
            raise
    raise AssertionError(f"{script}'s main returned without parsing its settings")


def command_problems(path, monkeypatch, capsys):
    """'FILE:LINE: ...' for each fenced command of path that its script's parser refuses."""
    from configurator import ConfigError
    problems = []
    monkeypatch.chdir(REPO)  # the commands' paths are relative to the checkout
    for number, script, argv, processes in repository_commands(path):
        where = f"{os.path.relpath(path, REPO) if path.startswith(REPO) else path}:{number}"
        if os.path.isabs(script):
            continue  # a harness written to /tmp by the page itself, not a script of this repository
        if not os.path.isfile(os.path.join(REPO, script)):
            problems.append(f"{where}: {script} is not a script of this repository")
            continue
        if "/" in script:
            continue  # a helper beside its files (assets/derive_tokenizer.py), without the --key=value dialect
        try:
            config = parse_with_script(script, argv, monkeypatch)
        except ConfigError as e:
            # a study config that reads the rates an earlier step chose fails until that step has run:
            # the command is right, and its --key=value settings are still checked, without the file
            if "failed: UserError" not in str(e):
                problems.append(f"{where}: {script} {' '.join(argv)}: {e}")
                continue
            try:
                config = parse_with_script(script, [a for a in argv if a.startswith("-")], monkeypatch)
            except ConfigError as e:
                problems.append(f"{where}: {script} {' '.join(argv)}: {e}")
                continue
        finally:
            capsys.readouterr()  # --help's listing, a study config's notes
        steps = config and script == "train.py" and config["gradient_accumulation_steps"]
        if steps and steps % processes:
            problems.append(f"{where}: {script} under torchrun: gradient_accumulation_steps ({steps}) is not a "
                            f"multiple of the {processes} processes")
    return problems


# ------------------------------------------------------------------------------------ the links

def link_problems(path):
    """'FILE:LINE: ...' for each relative link or image of path whose file (or section) does not exist."""
    problems, in_block = [], False
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if re.match(r"\s*```", line):
            in_block = not in_block
        if in_block:
            continue
        text = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(folder, file)) if file else os.path.abspath(path)
            if not os.path.exists(full):
                problems.append(f"{path}:{number}: {target}: no such file")
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                problems.append(f"{path}:{number}: {target}: no such section in {os.path.basename(full)}")
    return problems


def anchors(path):
    """The anchors GitHub gives a markdown file's headings: lowercased, punctuation dropped, spaces to -."""
    with open(path, encoding="utf-8") as f:
        headings = [line.lstrip("#").strip() for line in f if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


# ------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_documented_command_parses_with_its_script(document, monkeypatch, capsys):
    path = os.path.join(REPO, document)
    if document == "README.md":
        assert len(repository_commands(path)) > 20, "the checker finds the README's commands"
    assert command_problems(path, monkeypatch, capsys) == []


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_and_image_exists(document):
    assert link_problems(os.path.join(REPO, document)) == []


def test_the_checker_names_a_misspelled_key_a_wrong_world_size_and_a_missing_link(tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\nSee [the data](data.md), [this](#a-page) and ![a figure](missing.png).\n\n"
                    "```\n"
                    "python train.py config/quickstart.py --max_iters=10\n"
                    "for code in fixed_min learned; do python train.py --input_code=$code --max_iter=10; done\n"
                    "torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py \\\n"
                    "    --parallel=fsdp\n"
                    "(cd /tmp/nanogpt && python train.py --not_ours=1)\n"
                    "python prepare.py --encodng=bytes   # a comment\n"
                    "```\n")
    (tmp_path / "data.md").write_text("# Data\n")
    assert len(repository_commands(str(page))) == 5  # the loop's two values, not the other repository's
    problems = command_problems(str(page), monkeypatch, capsys)
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{page}:7: train.py --input_code=fixed_min --max_iter=10: unknown config key "
                                  "'max_iter'") and "did you mean 'max_iters'?" in problems[0]
    assert problems[1].startswith(f"{page}:7: train.py --input_code=learned")
    assert problems[2] == (f"{page}:8: train.py under torchrun: gradient_accumulation_steps (1) is not a multiple "
                           "of the 2 processes")
    assert problems[3].startswith(f"{page}:11: prepare.py --encodng=bytes: unknown config key 'encodng'")
    assert link_problems(str(page)) == [f"{page}:3: missing.png: no such file"]
    page.write_text("[gone](data.md#no-such-part) [there](data.md#data)\n")
    assert link_problems(str(page)) == [f"{page}:1: data.md#no-such-part: no such section in data.md"]


def test_the_training_page_names_every_train_key():
    from training import DEFAULTS
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        named = {key for row in f if row.startswith("| `") for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert sorted(set(DEFAULTS) - named) == [], "docs/training.md's key table lacks these train.py keys"


def test_the_quickstart_is_the_readmes_first_command_and_ci_runs_its_test_command():
    readme = os.path.join(REPO, "README.md")
    with open(readme, encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300, "README.md is a five-minute read: details go to docs/"
    blocks = fenced_blocks(readme)
    assert any("python train.py config/quickstart.py" in line for line in blocks[0][1])
    tests = next(lines for _, lines in blocks if any("pytest" in line for line in lines))
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line.split() for line in f if line.startswith("python -m pytest")]
    readme_command = [word for word in tests[0].split() if word != "-q"]
    assert [[word for word in line if word != "-q"] for line in ci] == [readme_command]


def test_a_setting_refused_under_torchrun_is_one_line_and_the_reason_in_torchruns_summary(shakespeare_bytes):
    """The issue's case: the tiny FSDP command with one micro-batch a step on two processes."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "config/quickstart.py", f"--dataset={shakespeare_bytes}", "--parallel=fsdp",
                             "--gradient_accumulation_steps=1", "--out_dir=unused"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 1
    reason = ("gradient_accumulation_steps (1) must be a multiple of the number of processes (2): tokens per step "
              "stay the same whatever the world size")
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == [f"error: {reason}"]  # rank 0 speaks
    summary = [line.strip() for line in lines if line.strip().startswith("traceback :")]
    assert summary == [f"traceback : error: {reason}"] * 2, result.stderr  # each process's entry, not a link
    assert not os.path.exists(os.path.join(REPO, "unused"))
