"""
Inside the network: what each layer of a trained run holds, on held-out tokens, so that runs that
differ only in their input code (fixed_min against the learned table) can be compared layer by layer.

    python analyze.py --runs=out-a,out-b --plot=inside.png --json=inside.json
    python analyze.py --runs=out-a --dataset=NAME --positions=100000   # other data, more held-out positions

Layer 0 is the input (what model.embed gives the first block), layer l the residual stream after
block l, read with forward hooks. For every run and layer:
- logit lens: the loss (nats/token) of predicting the next token from layer l through the model's own
  final norm and output layer. It is measured on eval.py's windows over the first positions + 1
  tokens of val, so the last layer's figure is `eval.py --max_val_tokens=POSITIONS+1`'s loss.
- probes: linear classifiers fitted on train positions (windows of block_size tokens at random
  starts drawn from --seed) and scored on the val positions above, for the current token's id, the
  previous token's id (positions that see it in their window), and two coarse properties of the token:
  for bytes its class (letter, digit, space, punctuation, other) and upper against lower case among
  letters; for a subword vocabulary whether it starts a word (a leading space, then a letter) and its
  frequency band (the quarter of the train tokens it falls in, most frequent ids first).
- geometry: for pairs of tokens of one surface form (an upper- and a lower-case letter; a subword
  with and without its leading space), the cosine similarity of their mean hidden states (centred on
  the layer's mean) against the same tokens with their partners shuffled.

The probe (--probe=lda, the default) is a linear discriminant: class means and one shared
within-class covariance, with a small ridge, solved in closed form, so fitting costs one d x d solve
and nothing is left to an optimizer's step count. It is linear because that is the smallest probe that
decodes every injective code exactly: a nearest-class-mean rule separates any set of distinct input
vectors, so at layer 0 an injective code scores exact id accuracy on every token the probe has seen,
where a smaller probe (fewer directions than the code's bits) would show the probe's limit instead;
anything bigger (an MLP) would decode what a layer holds non-linearly, which the next layer may not
be able to use. Its shared covariance is a lower bound on what is linearly there: --probe=softmax
fits multinomial logistic regression instead (full-batch Adam from zeros, so it too is deterministic),
which reads more of the previous id at about 12 times the CPU time.

Prints a table (every run, every layer) and the references each column is judged against: how far
the current token alone predicts the previous one (the reverse bigram table counted over the train
split), the identity probe's ceiling (val positions whose token the probe saw) and each property's
majority class. --plot draws the columns against the layer (runs of different depths against
relative depth, layer / n_layer); --json writes everything.
"""
import json
import os
import string
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import build_model, load_checkpoint
from common import (DEVICE_HELP, DTYPE_HELP, THREADS_HELP, UserError, atomic_write, autocast, data_dir, load_meta,
                    plot_figure, progress, resolve_device, resolve_dtype, run_main, set_threads)
from configurator import parse_config, split_settings
from tokenizer import get_encoding, token_bytes

SETTINGS = {  # key: (default, meaning)
    "runs": ("", "run folders (out_dir of train.py) to analyse and compare, comma-separated"),
    "dataset": ("", "the data to analyse on ('': the one the runs were trained on)"),
    "positions": (32768, "held-out positions: the first positions + 1 tokens of val.bin, in eval.py's windows"),
    "train_positions": (65536, "train.bin positions the probes are fitted on, in block_size windows at random starts"),
    "seed": (1, "draws the train windows: the same seed gives the same probes and scores"),
    "probe": ("lda", "lda (a linear discriminant, closed form) or softmax (logistic regression, 300 steps of "
                     "full-batch Adam: stronger on the previous id, about 12 times slower)"),
    "plot": ("", "also draw the comparison into this .png ('': none; needs matplotlib)"),
    "json": ("", "also write every figure into this .json file ('': none)"),
    "device": ("auto", DEVICE_HELP),
    "dtype": ("auto", f"{DTYPE_HELP}: as eval.py, so the lens's last layer is eval.py's loss"),
    "threads": (0, THREADS_HELP),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
WINDOWS_PER_FORWARD = 16
COUNTED_TRAIN_TOKENS = 10_000_000  # the bigram table and frequency bands count at most this much of train.bin
RIDGE = 1e-3  # of the mean variance per channel: keeps the covariance invertible, far below any code's spacing
MIN_PAIR_COUNT = 3  # occurrences of each token of a pair among the positions, for its mean state to count
SOFTMAX_STEPS, SOFTMAX_LR = 300, 3e-2  # from zeros, so the fit is deterministic; converged on the studies' runs
SCORE_ROWS = 2048  # positions scored at once: bounds the (rows, classes) score matrix of a large vocabulary


# ------------------------------------------------------------------------------ runs and data

def load_runs(runs, device):
    folders = list(dict.fromkeys(os.path.normpath(d.strip()) for d in runs.split(",") if d.strip()))
    if not folders:
        raise UserError("no runs given: pass --runs=DIR[,DIR...] (run folders holding ckpt.pt)")
    loaded = []
    for folder in folders:
        checkpoint = load_checkpoint(folder)
        model = build_model(checkpoint, device)
        loaded.append({"dir": folder, "model": model, "meta": checkpoint["meta"],
                       "dataset": checkpoint.get("config", {}).get("dataset", "")})
    vocabularies = {(run["meta"].get("encoding"), run["model"].config.vocab_size) for run in loaded}
    if len(vocabularies) > 1:
        shown = ", ".join(f"{run['dir']} ({run['meta'].get('encoding')}, V={run['model'].config.vocab_size})"
                          for run in loaded)
        raise UserError(f"runs of different vocabularies cannot be compared token by token: {shown}")
    codes = [run["model"].config.input_code for run in loaded]
    for run in loaded:  # the input code names a run, unless two runs share it
        run["label"] = run["model"].config.input_code if codes.count(run["model"].config.input_code) == 1 \
            else os.path.basename(run["dir"])
    return loaded


def chosen_dataset(runs, dataset):
    """--dataset, else the one dataset every run was trained on."""
    if dataset:
        return dataset
    trained_on = {os.path.realpath(data_dir(run["dataset"])): run["dataset"] for run in runs if run["dataset"]}
    if len(trained_on) > 1:
        raise UserError(f"the runs were trained on different datasets ({', '.join(sorted(trained_on.values()))}): pass "
                        f"--dataset=NAME to analyse them all on the same tokens")
    if not trained_on:
        raise UserError(f"the checkpoint in '{runs[0]['dir']}' does not name its dataset: pass --dataset=NAME")
    return next(iter(trained_on.values()))


def split_tokens(dataset, split, at_least):
    path = os.path.join(data_dir(dataset), f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"dataset '{dataset}' has no {split} split ({path} is missing): prepare it with prepare.py")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) < at_least:
        raise UserError(f"{split}.bin of '{dataset}' holds {len(tokens)} token(s), fewer than the {at_least} the "
                        f"analysis needs")
    return tokens


# ------------------------------------------------------------------------------ the residual stream

def val_windows(tokens, T, positions):
    """eval.py's windows over the first positions + 1 tokens: (start, length), each predicting length tokens."""
    n = min(len(tokens), positions + 1)
    return [(s, min(T, n - 1 - s)) for s in range(0, n - 1, T)]


def train_windows(tokens, T, positions, seed):
    """Windows of T tokens (the last one shorter, for exactly positions) at random starts drawn from seed."""
    rng = np.random.default_rng(seed)
    lengths = [T] * (positions // T) + ([positions % T] if positions % T else [])
    return [(int(rng.integers(0, len(tokens) - n + 1)), n) for n in lengths]


def window_ids(tokens, windows):
    """(current, previous, next) ids of every position of windows, previous -1 where the window does
    not hold it (its first position) and next -1 past the split's end."""
    current, previous, following = [], [], []
    for start, n in windows:
        ids = tokens[start:start + n + 1].astype(np.int64)
        current.append(ids[:n])
        previous.append(np.concatenate(([-1], ids[:n - 1])))
        following.append(np.pad(ids[1:n + 1], (0, n - len(ids[1:n + 1])), constant_values=-1))
    return tuple(torch.from_numpy(np.concatenate(a)) for a in (current, previous, following))


@torch.no_grad()
def residual_stream(model, tokens, windows, device, dtype, desc):
    """(positions, n_layer + 1, n_embd) float32: model.embed's output and every block's, at each position
    of windows, read with forward hooks (the blocks' signatures are not ours to depend on)."""
    layers = [model.embed, *model.blocks]
    captured = [None] * len(layers)

    def keeper(i):
        def keep(module, args, output):
            captured[i] = (output[0] if isinstance(output, (tuple, list)) else output).float().cpu()
        return keep

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    # windows of one length per forward (eval.py's last window is shorter)
    batches = [windows[i:i + WINDOWS_PER_FORWARD] for i in range(0, len(windows), WINDOWS_PER_FORWARD)]
    batches = [[w for w in batch if w[1] == n] for batch in batches for n in dict.fromkeys(w[1] for w in batch)]
    states = []
    try:
        for batch in progress(batches, desc=desc, leave=False):
            idx = torch.from_numpy(np.stack([tokens[s:s + n].astype(np.int64) for s, n in batch])).to(device)
            with autocast(device, dtype):  # the hooks keep the states; of the logits, only the last are made
                model(idx, lengths=torch.full((len(idx),), idx.size(1), device=device))
            states.append(torch.stack(captured, dim=2).flatten(0, 1))  # (B * n, n_layer + 1, n_embd)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(states)


@torch.no_grad()
def logit_lens(model, states, following, device, dtype):
    """Per layer, the mean next-token loss of reading it through model.norm_f and model.lm_head."""
    keep = following >= 0
    states, following = states[keep], following[keep]
    losses = []
    for layer in range(states.size(1)):
        total = 0.0
        for i in range(0, len(states), SCORE_ROWS):
            with autocast(device, dtype):
                logits = model.lm_head(model.norm_f(states[i:i + SCORE_ROWS, layer].to(device)))
            total += F.cross_entropy(logits.float(), following[i:i + SCORE_ROWS].to(device), reduction="sum").item()
        losses.append(total / len(states))
    return losses


# ------------------------------------------------------------------------------ probes

def fit_probe(x, y):
    """A linear discriminant on (x, y): (classes, centre, W, b) with scores (x - centre) @ W + b."""
    x = x.double()
    centre = x.mean(0)
    x = x - centre
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    means = torch.zeros(len(classes), x.size(1), dtype=x.dtype).index_add_(0, inverse, x) / counts[:, None]
    within = x - means[inverse]
    covariance = within.T @ within / len(x)
    ridge = RIDGE * float(x.var(0, correction=0).mean()) or RIDGE  # a constant input has no variance
    W = torch.linalg.solve(covariance + ridge * torch.eye(x.size(1), dtype=x.dtype), means.T)
    b = -0.5 * (means * W.T).sum(1) + torch.log(counts / len(x))
    return classes, centre.float(), W.float(), b.float()


def fit_softmax(x, y):
    """Multinomial logistic regression on (x, y), full-batch Adam from zeros, in fit_probe's form."""
    classes, inverse = torch.unique(y, return_inverse=True)
    centre = x.mean(0)
    scale = float(x.std(correction=0)) or 1.0  # one scale for all channels: a channel constant in train stays silent
    xs = (x - centre) / scale
    W = torch.zeros(x.size(1), len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=SOFTMAX_LR)
    with torch.enable_grad():
        for _ in range(SOFTMAX_STEPS):
            optimizer.zero_grad()
            F.cross_entropy(xs @ W + b, inverse).backward()
            optimizer.step()
    return classes, centre, W.detach() / scale, b.detach()


def probe_accuracy(probe, x, y):
    classes, centre, W, b = probe
    correct = 0
    for i in range(0, len(x), SCORE_ROWS):
        scores = (x[i:i + SCORE_ROWS] - centre) @ W + b
        correct += int((classes[scores.argmax(1)] == y[i:i + SCORE_ROWS]).sum())
    return correct / len(y)


def token_properties(encoding, vocab_size, counts):
    """{name: (V,) class of each id, -1 where the property does not apply}: bytes get their class and
    their case, a subword vocabulary word starts and frequency bands (from the train counts)."""
    if encoding.name == "bytes":
        groups = (string.ascii_letters, string.digits, string.whitespace, string.punctuation)
        kind = [next((g for g, chars in enumerate(groups) if chr(t) in chars), len(groups)) if t < 256 else
                len(groups) for t in range(vocab_size)]
        case = [int(chr(t).isupper()) if t < 256 and chr(t) in string.ascii_letters else -1 for t in range(vocab_size)]
        return {"byte class (letter/digit/space/punct/other)": torch.tensor(kind),
                "upper vs lower case (letters)": torch.tensor(case)}
    pieces = token_bytes(encoding)
    starts = [int(p[:1] == b" " and p[1:2].isalpha()) for p in pieces]
    order = np.argsort(-counts, kind="stable")
    before = np.cumsum(counts[order]) - counts[order]  # train tokens of the ids more frequent than this one
    band = np.empty(vocab_size, dtype=np.int64)
    band[order] = np.minimum(4 * before // max(counts.sum(), 1), 3)
    return {"word start (leading space + letter)": torch.tensor(starts),
            "frequency band (train quarters)": torch.from_numpy(band)}


def surface_pairs(encoding):
    """(a, b) id pairs of one surface form: (upper, lower) letters for bytes, (' word', 'word') else."""
    if encoding.name == "bytes":
        return [(ord(c), ord(c.lower())) for c in string.ascii_uppercase]
    ids = {piece: t for t, piece in enumerate(token_bytes(encoding)) if piece}
    return [(t, ids[piece[1:]]) for piece, t in ids.items()
            if piece[:1] == b" " and piece[1:2].isalpha() and piece[1:] in ids]


def reverse_bigram(train, vocab_size):
    """(V,) the most frequent previous token of each id in (the first COUNTED_TRAIN_TOKENS of) train,
    the most frequent token for ids never seen; and the counts of each id."""
    ids = train[:COUNTED_TRAIN_TOKENS].astype(np.int64)
    counts = np.bincount(ids, minlength=vocab_size)
    pairs, pair_counts = np.unique(ids[1:] * vocab_size + ids[:-1], return_counts=True)
    current, previous = pairs // vocab_size, pairs % vocab_size
    order = np.lexsort((-pair_counts, current))  # by current id, the most frequent previous first
    best = np.full(vocab_size, int(counts.argmax()), dtype=np.int64)
    first = order[np.r_[True, current[order][1:] != current[order][:-1]]]
    best[current[first]] = previous[first]
    return torch.from_numpy(best), counts


# ------------------------------------------------------------------------------ geometry

def pair_similarity(parts, pairs, vocab_size):
    """Per layer, (mean cosine of the pairs' mean states, the same with partners shuffled), over the
    positions of parts [(states, current ids), ...], centred on the layer's mean state; None when fewer
    than 2 pairs occur MIN_PAIR_COUNT times each."""
    counts = sum(torch.bincount(current, minlength=vocab_size) for _, current in parts)
    pairs = [(a, b) for a, b in pairs if min(counts[a], counts[b]) >= MIN_PAIR_COUNT]
    if len(pairs) < 2:
        return None, 0
    tokens = torch.tensor([t for pair in pairs for t in pair])
    slot = torch.full((vocab_size,), -1, dtype=torch.long)
    slot[tokens] = torch.arange(len(tokens))
    means = torch.zeros(len(tokens), *parts[0][0].shape[1:])
    for states, current in parts:
        at = slot[current]
        means.index_add_(0, at[at >= 0], states[at >= 0])
    centre = sum(states.sum(0) for states, _ in parts) / sum(len(states) for states, _ in parts)
    means = means / counts[tokens][:, None, None] - centre
    unit = F.normalize(means, dim=-1)
    first, second = unit[0::2], unit[1::2]  # (P, n_layer + 1, n_embd)
    cosines = torch.einsum("ild,jld->lij", first, second)  # (n_layer + 1, P, P): the diagonal is the pairs
    matched = cosines.diagonal(dim1=1, dim2=2).mean(1)
    shuffled = (cosines.sum((1, 2)) - cosines.diagonal(dim1=1, dim2=2).sum(1)) / (len(pairs) * (len(pairs) - 1))
    return list(zip(matched.tolist(), shuffled.tolist())), len(pairs)


# ------------------------------------------------------------------------------ one run

def analyze_run(run, data, cfg, device, dtype):
    model, T = run["model"], run["model"].config.block_size
    started = time.perf_counter()
    val = data["val"]
    windows = val_windows(val, T, cfg["positions"])
    val_states = residual_stream(model, val, windows, device, dtype, f"{run['label']}: val")
    val_ids = window_ids(val, windows)
    train_w = train_windows(data["train"], T, cfg["train_positions"], cfg["seed"])
    train_states = residual_stream(model, data["train"], train_w, device, dtype, f"{run['label']}: train")
    train_ids = window_ids(data["train"], train_w)
    lens = logit_lens(model, val_states, val_ids[2], device, dtype)

    targets = {"current id": lambda ids: ids[0], "previous id": lambda ids: ids[1],
               **{name: (lambda ids, p=prop: p[ids[0]]) for name, prop in data["properties"].items()}}
    probes = {name: [] for name in targets}
    for layer in progress(range(model.config.n_layer + 1), desc=f"{run['label']}: probes", leave=False):
        for name, target in targets.items():
            y_train, y_val = target(train_ids), target(val_ids)
            fit, score = y_train >= 0, y_val >= 0
            if not (fit.any() and score.any()):  # too few positions for this column (no letter among them)
                probes[name].append(None)
                continue
            probe = (fit_softmax if cfg["probe"] == "softmax" else fit_probe)(train_states[fit, layer], y_train[fit])
            probes[name].append(probe_accuracy(probe, val_states[score, layer], y_val[score]))

    geometry, n_pairs = pair_similarity([(train_states, train_ids[0]), (val_states, val_ids[0])], data["pairs"],
                                        data["vocab_size"])
    L = model.config.n_layer
    layers = [{"layer": l, "relative_depth": l / L, "lens_loss": lens[l],
               "probes": {name: probes[name][l] for name in probes},
               "pair_cosine": geometry[l][0] if geometry else None,
               "shuffled_pair_cosine": geometry[l][1] if geometry else None} for l in range(L + 1)]
    seconds = time.perf_counter() - started
    print(f"{run['dir']}: {L} layers analysed in {seconds:.1f} s", file=sys.stderr)
    return {"run": run["dir"], "label": run["label"], "input_code": model.config.input_code, "n_layer": L,
            "block_size": T, "val_positions": len(val_ids[0]), "train_positions": len(train_ids[0]),
            "pairs": n_pairs, "seconds": seconds, "references": references(data, val_ids, train_ids),
            "layers": layers}


def references(data, val_ids, train_ids):
    """{probe column: (value, meaning)}: what each column is judged against, on this run's positions."""
    current, previous = val_ids[0], val_ids[1]
    has_previous = previous >= 0
    refs = {"current id": (fraction(torch.isin(current, train_ids[0])),
                           "ceiling (val positions whose id the probe saw in train)"),
            "previous id": (fraction(data["bigram"][current[has_previous]] == previous[has_previous]),
                            "from the current id alone (the train split's reverse bigram table)")}
    for name, prop in data["properties"].items():
        y_val, y_train = prop[current], prop[train_ids[0]]
        y_val, y_train = y_val[y_val >= 0], y_train[y_train >= 0]
        majority = torch.bincount(y_train).argmax() if len(y_train) else -1
        refs[name] = (fraction(y_val == majority), "majority class (of the train positions)")
    return refs


def fraction(hits):
    """The share of True in a bool tensor, counted exactly (as the probes' accuracies are); None if empty."""
    return int(hits.sum()) / len(hits) if len(hits) else None


# ------------------------------------------------------------------------------ table and figure

def shown(value):
    return "-" if value is None else f"{value:.3f}"


def table(results):
    columns = list(results[0]["layers"][0]["probes"])
    head = ["run", "layer", "depth", "lens loss", *columns, "pair cos", "shuffled cos"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for result in results:
        for layer in result["layers"]:
            cos = [shown(layer[k]) for k in ("pair_cosine", "shuffled_pair_cosine")]
            cells = [result["label"], str(layer["layer"]), f"{layer['relative_depth']:.2f}",
                     f"{layer['lens_loss']:.4f}", *(shown(layer["probes"][c]) for c in columns), *cos]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results, title, path):
    relative = len({r["n_layer"] for r in results}) > 1
    columns = list(results[0]["layers"][0]["probes"])
    panels = ["logit lens: loss (nats/token)", *(f"probe: {c}" for c in columns), "cosine of pair means"]
    fig = plot_figure(figsize=(13, 7))
    axes = fig.subplots(2, 3)
    for i, result in enumerate(results):
        colour = f"C{i % 10}"
        x = [layer["relative_depth" if relative else "layer"] for layer in result["layers"]]
        series = [[layer["lens_loss"] for layer in result["layers"]],
                  *([layer["probes"][c] for layer in result["layers"]] for c in columns)]
        for ax, ys in zip(axes.flat, series):
            ax.plot(x, ys, color=colour, marker="o", markersize=3, label=result["label"])
        if result["layers"][0]["pair_cosine"] is not None:
            geometry = axes.flat[len(series)]
            geometry.plot(x, [layer["pair_cosine"] for layer in result["layers"]], color=colour, marker="o",
                          markersize=3, label=f"{result['label']}: pairs")
            geometry.plot(x, [layer["shuffled_pair_cosine"] for layer in result["layers"]], color=colour, ls="--",
                          label=f"{result['label']}: shuffled")
    for panel, column in enumerate(columns, start=1):  # the reference each probe column is judged against
        value, meaning = results[0]["references"][column]
        if value is not None:
            axes.flat[panel].axhline(value, color="grey", ls=":", lw=1, label=meaning.split(" (")[0])
    for ax, name in zip(axes.flat, panels):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("relative depth (layer / n_layer)" if relative else "layer (0: the input)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the geometry panel is empty without pairs
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# ------------------------------------------------------------------------------ main

def check_settings(cfg):
    if cfg["positions"] < 1 or cfg["train_positions"] < 1:
        raise UserError(f"positions and train_positions must be at least 1, got {cfg['positions']} and "
                        f"{cfg['train_positions']}")
    if cfg["probe"] not in ("lda", "softmax"):
        raise UserError(f"probe must be lda or softmax, got '{cfg['probe']}'")
    if cfg["seed"] < 0:
        raise UserError(f"seed must be 0 or more, got {cfg['seed']}")
    if cfg["plot"] and not cfg["plot"].endswith(".png"):
        raise UserError(f"plot must name a .png file, got '{cfg['plot']}'")
    if cfg["plot"]:
        plot_figure()  # a missing matplotlib fails now, not after the work
    for path in filter(None, (cfg["plot"], cfg["json"])):
        folder = os.path.dirname(os.path.abspath(path))
        try:  # a file that cannot be written fails now, not after the work
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror})")


def check_memory(runs, positions, train_positions):
    """The residual stream of every position is held in memory (float32): refuse what would not fit."""
    need = max(4 * (positions + train_positions) * (run["model"].config.n_layer + 1)
               * run["model"].config.n_embd for run in runs)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # a platform without these names: no check
        return
    if need > have / 2:
        raise UserError(f"the hidden states of {positions:,} + {train_positions:,} positions take "
                        f"{need / 2 ** 30:.1f} GiB, more than half of this machine's {have / 2 ** 30:.0f} GiB: lower "
                        f"--positions and --train_positions")


def load_data(runs, cfg):
    dataset = chosen_dataset(runs, cfg["dataset"])
    meta, trained_on = load_meta(dataset), runs[0]["meta"]
    if (meta["encoding"], meta["vocab_size"]) != (trained_on.get("encoding"), trained_on.get("vocab_size")):
        raise UserError(f"dataset '{dataset}' uses {meta['encoding']} (V={meta['vocab_size']}) but the runs were "
                        f"trained on {trained_on.get('encoding')} (V={trained_on.get('vocab_size')}): analyse them on "
                        f"data of the same encoding")
    try:
        encoding = get_encoding(meta["encoding"])
    except ValueError as e:
        raise UserError(f"cannot read the tokens of '{dataset}': {e}")
    vocab_size = runs[0]["model"].config.vocab_size
    longest = max(run["model"].config.block_size for run in runs)
    train = split_tokens(dataset, "train", min(longest, cfg["train_positions"]) + 1)
    bigram, counts = reverse_bigram(train, vocab_size)
    return {"dataset": dataset, "encoding": meta["encoding"], "vocab_size": vocab_size,
            "val": split_tokens(dataset, "val", 2), "train": train, "bigram": bigram,
            "properties": token_properties(encoding, vocab_size, counts), "pairs": surface_pairs(encoding)}


def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    check_settings(cfg)
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    runs = load_runs(cfg["runs"], device)
    # the threads that suit the largest model's forward passes
    largest = max((run["model"] for run in runs), key=lambda model: model.flops_per_token() * model.config.block_size)
    set_threads(cfg["threads"], device, largest, WINDOWS_PER_FORWARD * largest.config.block_size)
    data = load_data(runs, cfg)
    check_memory(runs, min(cfg["positions"], len(data["val"]) - 1), cfg["train_positions"])
    results = [analyze_run(run, data, cfg, device, dtype) for run in runs]

    first = results[0]
    pair_kind = "upper/lower-case letters" if data["encoding"] == "bytes" else "subwords with/without a leading space"
    summary = (f"{data['dataset']} ({data['encoding']}, V={data['vocab_size']:,}): {first['val_positions']:,} val "
               f"positions in eval.py's windows, {cfg['probe']} probes fitted on {first['train_positions']:,} train "
               f"positions (seed {cfg['seed']}); {first['pairs']} pairs of {pair_kind}")
    print(summary + ".\n")
    lines = dict.fromkeys(  # runs of one block_size share their positions, so their references
        f"{column}: {shown(value)}, {meaning}"
        for result in results for column, (value, meaning) in result["references"].items())
    print("references (what each probe column is judged against):\n" + "\n".join(f"- {line}" for line in lines))
    print("\n" + table(results))
    if cfg["json"]:
        report = {"dataset": data["dataset"], "encoding": data["encoding"], "vocab_size": data["vocab_size"],
                  "seed": cfg["seed"], "probe": cfg["probe"], "runs": results}
        atomic_write(cfg["json"], lambda f: f.write(json.dumps(report, indent=2).encode()))
        print(f"wrote {cfg['json']}", file=sys.stderr)
    if cfg["plot"]:
        plot(results, summary, cfg["plot"])
        print(f"wrote {cfg['plot']}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
