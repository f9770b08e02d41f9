# Width study, step 3 of 4 (docs/studies.md): the input's scale. A learned table starts with rows
# of RMS 0.02, a {-1, +1} code has RMS code_scale = 1: the fixed code enters the residual stream about 50
# times louder than the table it replaces, and each block's output starts small beside it (every block
# reads it through RMSNorm, so the scale only sets its weight in the stream). fixed_min at code_scale 0.02,
# 0.1 and 0.3, at widths 64 and 128 (2 layers), on both corpora in bytes and cl100k_4096, at the rate
# step 1 chose for fixed_min at that width (at code_scale 1; not tuned per scale), 3 paired seeds. Its
# code_scale = 1 and learned runs are step 2's, so report both tables together. 1/sqrt(n_embd) (0.125,
# 0.088) lies inside the range swept.
#
#   python sweep.py config/study_scale.py      # 72 runs; about 30 min on 2 cores (docs/studies.md)
#   python report.py --results=results/width.jsonl,results/scale.jsonl --where='n_embd=64,128' --x=n_embd
import runpy

from studies import chosen_rates

_step1 = runpy.run_path('config/study_width_lr.py')  # its datasets, how to make them, their budgets
_wanted = [(_dataset, _width, 'fixed_min') for _dataset in _step1['_corpora'] for _width in (64, 128)]
# every cell of step 1 at these keys, or (a table still being written) one error naming those it lacks
_rates = chosen_rates(_step1, _wanted)
_cells = []
for _dataset, _width, _code in _wanted:
    _steps = _step1['_steps'][_step1['_corpora'][_dataset][1]]
    _cells.append((_dataset, *_steps, _width, *_rates[_dataset, _width, _code]))

base = 'config/scale.py'
prepare = _step1['prepare']
grid = {
    ('dataset', 'max_iters', 'lr_decay_iters', 'warmup_iters', 'n_embd', 'learning_rate', 'min_lr'): _cells,
    'input_code': ['fixed_min'],
    'code_scale': [0.02, 0.1, 0.3],
    'n_layer': [2],
    'seed': [1, 2, 3],
}
results = 'results/scale.jsonl'
runs_dir = 'out-study/scale'
