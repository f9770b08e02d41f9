"""
A study's results table, as sweep.py writes it (JSONL, one row per finished run), read back: by report.py
for its tables, and by the study configs whose step reads the learning rates an earlier step chose.
"""
import json
import statistics
import sys

from common import UserError
from training import DEFAULTS as TRAIN_DEFAULTS


def load_results(paths):
    """The rows of the tables at paths, each checked for what pairing needs; UserError names a bad line."""
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
            rows.append(row)
    if not rows:
        raise UserError(f"no results rows in {', '.join(paths)}: run the study first "
                        f"(python sweep.py config/study_...py)")
    grid_keys = {k for row in rows for k in row["cell"]}
    for row in rows:  # a row kept from before its grid gained a key: its value is the one it trained with
        for k in grid_keys - set(row["cell"]):
            row["cell"][k] = row.get("config", {}).get(k, TRAIN_DEFAULTS.get(k))
    return rows


def chosen_rates(path, wanted, keys=("dataset", "n_embd", "input_code")):
    """{(dataset, n_embd, input_code): (learning_rate, min_lr)} of a learning-rate study scored on the test
    split (config/study_width_lr.py): per key, the rate of lowest mean test loss over the seeds. For study
    configs, which read the rates chosen by the step before them. A rate at the edge of those tried is
    said in a note: the best may lie beyond it (add a rate to the study; its finished cells are kept).
    wanted: the keys the study needs; one the table lacks is an error."""
    try:
        rows = [row for row in load_results([path]) if row["split"] == "test"]
    except UserError as e:
        raise UserError(f"{e} (the learning rates are chosen from it: run that step first)") from None
    losses = {}
    for row in rows:
        key = tuple(row["config"][k] for k in keys)
        rate = (row["config"]["learning_rate"], row["config"]["min_lr"])
        losses.setdefault(key, {}).setdefault(rate, []).append(row["loss"])
    chosen = {}
    for key, by_rate in losses.items():
        chosen[key] = min(by_rate, key=lambda rate: statistics.mean(by_rate[rate]))
        if len(by_rate) > 1 and chosen[key][0] in (min(by_rate)[0], max(by_rate)[0]):
            print(f"note: {path}: for {', '.join(map(str, key))} the best rate, {chosen[key][0]:g}, is at the edge of "
                  f"those tried", file=sys.stderr)
    missing = [key for key in wanted if key not in chosen]
    if missing:
        raise UserError(f"{path} has no test-split rows for {', '.join(map(str, missing[0]))}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: run the study that "
                        f"chooses those rates first")
    return chosen
