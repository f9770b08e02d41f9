# Width study, step 4 of 4 (docs/studies.md): the gap against tokens, at the best setting of steps
# 2 and 3: 300, 1,200 and 5,000 steps of 1,024 tokens (307K, 1.2M and 5.1M tokens; 5.5 epochs of
# Shakespeare's 924K train tokens and 2.6 of the novels' 2.0M at the largest), warmup and cosine decay
# scaled to each budget, fixed_min and learned, both corpora, at the rate step 1 chose for the width
# (at 600 steps), 3 paired seeds. Bytes only: cl100k_4096 costs about 4 times more per token here
# (arithmetic from the per-step times), past the study's 4 hours.
#
# _best is the setting of smallest gap in steps 2 and 3, over both bytes corpora: width 128 at code_scale
# 0.1 (gaps +0.007 and +0.003 nats on val, mean +0.005; width 64 at code_scale 1: -0.013 and +0.049).
#
#   python sweep.py config/study_tokens.py     # 36 runs (docs/studies.md)
#   python report.py --results=results/tokens.jsonl --plot=assets/gap_tokens.png --fit=True
import runpy

from studies import chosen_rates

_best = {'n_embd': 128, 'code_scale': 0.1}
_datasets = ['study_bytes', 'study_novels_bytes']
_step1 = runpy.run_path('config/study_width_lr.py')  # how to make the datasets
_wanted = []  # (a loop: a comprehension in a config file sees none of its names)
for _dataset in _datasets:
    _wanted += [(_dataset, _best['n_embd'], 'fixed_min'), (_dataset, _best['n_embd'], 'learned')]
# every cell of step 1 at these keys, or (a table still being written) one error naming those it lacks
_rates = chosen_rates(_step1, _wanted)
_cells = []
for _dataset, _width, _code in _wanted:
    _scale = _best['code_scale'] if _code == 'fixed_min' else 1.0
    _cells.append((_dataset, _code, _scale, *_rates[_dataset, _width, _code]))

base = 'config/scale.py'
prepare = _step1['prepare']
grid = {
    ('dataset', 'input_code', 'code_scale', 'learning_rate', 'min_lr'): _cells,
    ('max_iters', 'lr_decay_iters', 'warmup_iters'): [(300, 300, 20), (1200, 1200, 60), (5000, 5000, 200)],
    'n_embd': [_best['n_embd']],
    'n_layer': [2],
    'seed': [1, 2, 3],
}
results = 'results/tokens.jsonl'
runs_dir = 'out-study/tokens'
