# Spelling study, step 2 of 2 (issue 36): does a fixed input that spells the token (the spelling code,
# code_width 64) close fixed_min's gap to the learned table on a subword vocabulary? spelling, fixed_min
# and learned at 2 and 4 layers, width 64, on both corpora in cl100k_4096, and the control: the three at
# 2 layers on Shakespeare in bytes, where the spelling is the byte again and spelling should match
# fixed_min. The datasets and budgets of the width study (config/study_width_lr.py); each code at its
# rate chosen on the test split: by step 1 (config/study_spell_lr.py, results/spell_lr.jsonl) for
# spelling, and for fixed_min and learned at 4 layers; by the width study (results/width_lr.jsonl, width
# 64) for fixed_min and learned at 2 layers, whose runs here are the width study's runs at width 64.
# 3 paired seeds; the held-out loss on val.
#
#   python sweep.py config/study_spell.py      # 45 runs (36 in cl100k_4096, 9 in bytes)
#   python report.py --results=results/spell.jsonl
import runpy

from studies import chosen_rates

_step1 = runpy.run_path('config/study_spell_lr.py')
_width = runpy.run_path('config/study_width_lr.py')  # the datasets, how to make them, their budgets
_wanted = [(_dataset, _layers, _code) for _dataset in ('study_bpe4096', 'study_novels_4096') for _layers in (2, 4)
           for _code in ('spelling', 'fixed_min', 'learned')]
_wanted += [('study_bytes', 2, _code) for _code in ('spelling', 'fixed_min', 'learned')]
_rates = chosen_rates(_step1, _step1['_choices'], keys=('dataset', 'n_layer', 'input_code'))
_from_width = [(_dataset, 64, _code) for _dataset, _layers, _code in _wanted if _layers == 2 and _code != 'spelling']
_width_rates = chosen_rates(_width, _from_width)
for _dataset, _, _code in _from_width:  # the width study's runs are at 2 layers
    _rates[_dataset, 2, _code] = _width_rates[_dataset, 64, _code]
_cells = []
for _dataset, _layers, _code in _wanted:
    _steps = _width['_steps'][_width['_corpora'][_dataset][1]]
    _cells.append((_dataset, *_steps, _layers, _code, _step1['_code_width'][_code], *_rates[_dataset, _layers, _code]))

base = 'config/scale.py'
prepare = _width['prepare']
grid = {
    ('dataset', 'max_iters', 'lr_decay_iters', 'warmup_iters', 'n_layer', 'input_code', 'code_width',
     'learning_rate', 'min_lr'): _cells,
    'seed': [1, 2, 3],
}
results = 'results/spell.jsonl'
runs_dir = 'out-study/spell'
