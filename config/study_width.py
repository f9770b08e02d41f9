# Width study, step 2 of 4 (docs/studies.md): does fixed_min's gap to the learned table close or
# open with width? Widths 64, 128 and 256 at 2 layers, on both corpora in bytes and in cl100k_4096 (the
# datasets and budgets of step 1, config/study_width_lr.py), each code at the rate step 1 chose for its
# dataset and width on the test split (results/width_lr.jsonl), 3 paired seeds; the held-out loss on val.
#
#   python sweep.py config/study_width.py      # 72 runs; about 50 min on 2 cores (docs/studies.md)
#   python report.py --results=results/width.jsonl --plot=assets/gap_width.png --fit=True
import runpy

from studies import chosen_rates

_step1 = runpy.run_path('config/study_width_lr.py')  # its datasets, how to make them, their budgets
_wanted = []
for _dataset, (_text, _encoding) in _step1['_corpora'].items():
    for _width in (64, 128, 256):
        for _code in ('fixed_min', 'learned'):
            _wanted.append((_dataset, _width, _code))
# every cell of step 1 at these keys, or (a table still being written) one error naming those it lacks
_rates = chosen_rates(_step1, _wanted)
_cells = []
for _dataset, _width, _code in _wanted:
    _steps = _step1['_steps'][_step1['_corpora'][_dataset][1]]
    _cells.append((_dataset, *_steps, _width, _code, *_rates[_dataset, _width, _code]))

base = 'config/scale.py'
prepare = _step1['prepare']
grid = {
    ('dataset', 'max_iters', 'lr_decay_iters', 'warmup_iters', 'n_embd', 'input_code', 'learning_rate',
     'min_lr'): _cells,
    'n_layer': [2],
    'seed': [1, 2, 3],
}
results = 'results/width.jsonl'
runs_dir = 'out-study/width'
