"""
A study's results table, as sweep.py writes it (JSONL, one row per finished run), read back: by report.py
for its tables, and by the study configs whose step reads the learning rates an earlier step chose; and
where `sweep.py --verify` records the verification of a table (beside it, STUDY.verify.json).
"""
import itertools
import json
import os
import statistics
import sys
from collections import Counter

from common import UserError
from configurator import parse_config
from training import DEFAULTS as TRAIN_DEFAULTS


def load_results(paths):
    """The rows of the tables at paths, each checked for what pairing needs and given `table`, the path it
    was read from; UserError names a bad line."""
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError as e:
            raise UserError(f"cannot read results {path}: {e.strerror}")
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                row["cell"]["input_code"], row["cell"]["seed"], row["loss"]  # what pairing needs
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{number} is not a results row of sweep.py (cell with input_code and seed, "
                                f"loss)")
            rows.append({**row, "table": path})
    if not rows:
        raise UserError(f"no results rows in {', '.join(paths)}: run the study first "
                        f"(python sweep.py config/study_...py)")
    grid_keys = {k for row in rows for k in row["cell"]}
    for row in rows:  # a row kept from before its grid gained a key: its value is the one it trained with
        for k in grid_keys - set(row["cell"]):
            row["cell"][k] = row.get("config", {}).get(k, TRAIN_DEFAULTS.get(k))
    return rows


def verification_path(results):
    """results/width_lr.jsonl -> results/width_lr.verify.json: where sweep.py --verify records its check."""
    return results.removesuffix(".jsonl") + ".verify.json"


def load_verification(results):
    """The record of the last `sweep.py --verify` of the table at results, or None if it has none."""
    path = verification_path(results)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        record["code_hash"], record["passed"], record["cells"]  # what report.py reads
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a record of sweep.py --verify: remove it, or verify the table again")
    return record


def grid_cells(study):
    """Every cell of a study config's grid (the product of its axes, as sweep.py runs them) as the train
    settings it makes: its base config, the study's dataset, then the cell's grid values."""
    base = study["base"] if isinstance(study["base"], dict) else parse_config(TRAIN_DEFAULTS, [study["base"]])
    settings = {**TRAIN_DEFAULTS, **base, **({"dataset": study["dataset"]} if study.get("dataset") else {})}
    axes = [(entry if isinstance(entry, tuple) else (entry,), [v if isinstance(entry, tuple) else (v,) for v in values])
            for entry, values in study["grid"].items()]
    keys = [key for axis_keys, _ in axes for key in axis_keys]
    for combination in itertools.product(*(values for _, values in axes)):
        yield {**settings, **dict(zip(keys, (value for row in combination for value in row)))}


def chosen_rates(step, wanted, keys=("dataset", "n_embd", "input_code")):
    """{(dataset, n_embd, input_code): (learning_rate, min_lr)} chosen by a learning-rate study scored on the
    test split: per key, the rate of lowest mean test loss over the seeds. For the study configs of the steps
    after it. step: that study's config as runpy.run_path reads it (config/study_width_lr.py); wanted: the
    keys this step needs. Every cell of its grid at those keys must be in its table: until then (a table
    being written, or none yet) a UserError says in one line which cells it lacks and how to run them. A
    rate at the edge of those tried is said in a note: the best may lie beyond it (add a rate to the
    study; its finished cells are kept)."""
    path, config = step["results"], step.get("__file__", "the study that chooses these rates")
    needed = {key: set() for key in wanted}
    for cell in grid_cells(step):
        key = tuple(cell[k] for k in keys)
        if key in needed:
            needed[key].add((cell["learning_rate"], cell["min_lr"], cell["seed"]))
    untried = [key for key, cells in needed.items() if not cells]
    if untried:
        raise UserError(f"{config} tries no rate for {', '.join(map(str, untried[0]))}: add it to its grid")
    rows = [row for row in (load_results([path]) if os.path.isfile(path) and os.path.getsize(path) else [])
            if row["split"] == "test"]
    losses, finished = {}, set()
    for row in rows:
        key = tuple(row["config"][k] for k in keys)
        rate = (row["config"]["learning_rate"], row["config"]["min_lr"])
        losses.setdefault(key, {}).setdefault(rate, []).append(row["loss"])
        finished.add((key, *rate, row["config"]["seed"]))
    lacking = [(key, *cell) for key in wanted for cell in sorted(needed[key]) if (key, *cell) not in finished]
    if lacking:
        per_first = ", ".join(f"{first}: {n}" for first, n in Counter(str(c[0][0]) for c in lacking).items())
        key, rate, _, seed = lacking[0]
        first = ", ".join([*(f"{k} {v}" for k, v in zip(keys, key)), f"learning_rate {rate:g}", f"seed {seed}"])
        raise UserError(f"{path} lacks {len(lacking)} of the {sum(map(len, needed.values()))} cells these rates are "
                        f"chosen from ({per_first}; the first: {first}): finish that step first: "
                        f"python sweep.py {config}")
    chosen = {}
    for key in wanted:
        by_rate = losses[key]
        chosen[key] = min(by_rate, key=lambda rate: statistics.mean(by_rate[rate]))
        if len(by_rate) > 1 and chosen[key][0] in (min(by_rate)[0], max(by_rate)[0]):
            print(f"note: {path}: for {', '.join(map(str, key))} the best rate, {chosen[key][0]:g}, is at the edge of "
                  f"those tried", file=sys.stderr)
    return chosen
