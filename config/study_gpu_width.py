# The width study on one GPU, step 2 of 2 (docs/studies.md): fixed_min against learned at widths
# 512, 768 and 1024 on both corpora in bytes and cl100k_4096 (the runs of config/study_gpu_width_lr.py),
# each code at the rate step 1 chose for its dataset and width on the test split, 3 paired seeds; the
# held-out loss on val. To add the input scale or the tokens, add code_scale or (max_iters,
# lr_decay_iters) to the grid, as config/study_scale.py and study_tokens.py do on the CPU.
#
#   python sweep.py config/study_gpu_width.py      # 72 runs; time: docs/studies.md (arithmetic)
#   python report.py --results=results/gpu_width.jsonl,results/width.jsonl --fit=True
import runpy

from studies import chosen_rates

_step1 = runpy.run_path('config/study_gpu_width_lr.py')  # its datasets, model and budget
_wanted = []
for _dataset in _step1['_corpora']:
    for _width in (512, 768, 1024):
        _wanted += [(_dataset, _width, 'fixed_min'), (_dataset, _width, 'learned')]
# every cell of step 1 at these keys, or (a table still being written) one error naming those it lacks
_rates = chosen_rates(_step1, _wanted)
_cells = []
for _dataset, _width, _code in _wanted:
    _cells.append((_dataset, _width, _width // 64, _code, *_rates[_dataset, _width, _code]))

base = _step1['base']
prepare = _step1['prepare']
grid = {
    ('dataset', 'n_embd', 'n_head', 'input_code', 'learning_rate', 'min_lr'): _cells,
    'seed': [1, 2, 3],
}
jobs = 1
results = 'results/gpu_width.jsonl'
runs_dir = 'out-study/gpu_width'
