# Spelling study, step 1 of 2 (issue 36): the learning rate of the spelling code (model.py: fixed_min's K
# bits followed by a SimHash of the token's byte n-grams; code_width 64, one bit per channel) at 2 and 4
# layers, width 64, on both corpora in cl100k_4096 (Shakespeare; the two novels of assets/novels/), and
# at 2 layers on Shakespeare in bytes, the control, where a token's spelling is its byte again. The
# datasets and budgets are the width study's (config/study_width_lr.py: 300 steps in cl100k_4096, 600 in
# bytes), whose rates for fixed_min and learned at width 64 and 2 layers step 2 reuses; this step also
# chooses theirs at 4 layers. Three rates a factor 2 apart, centred on the width study's centre for the
# vocabulary (spelling on fixed_min's), two seeds, scored on the test split, never on val. Step 2
# (config/study_spell.py) reads the rate of lowest mean test loss per dataset, depth and code.
#
#   python sweep.py config/study_spell_lr.py   # 54 runs (8 x 3 x 2 in cl100k_4096, 3 x 2 in bytes)
import runpy

_width = runpy.run_path('config/study_width_lr.py')  # its datasets, how to make them, their budgets
_centre = {('cl100k_4096', 'spelling'): 6e-3, ('cl100k_4096', 'fixed_min'): 6e-3,
           ('cl100k_4096', 'learned'): 3e-3, ('bytes', 'spelling'): 1.2e-2}
_code_width = {'spelling': 64, 'fixed_min': 0, 'learned': 0}
# (dataset, n_layer, input_code) whose rate this step chooses; the bytes one is the control
_choices = [(_dataset, _layers, _code) for _dataset in ('study_bpe4096', 'study_novels_4096')
            for _layers, _code in ((2, 'spelling'), (4, 'spelling'), (4, 'fixed_min'), (4, 'learned'))]
_choices.append(('study_bytes', 2, 'spelling'))
_cells = []
for _dataset, _layers, _code in _choices:
    _encoding = _width['_corpora'][_dataset][1]
    for _factor in (0.5, 1, 2):
        _lr = round(_centre[_encoding, _code] * _factor, 8)
        _cells.append((_dataset, *_width['_steps'][_encoding], _layers, _code, _code_width[_code], _lr,
                       round(_lr / 10, 9)))

base = 'config/scale.py'
prepare = _width['prepare']
eval_split = 'test'
grid = {
    ('dataset', 'max_iters', 'lr_decay_iters', 'warmup_iters', 'n_layer', 'input_code', 'code_width',
     'learning_rate', 'min_lr'): _cells,
    'seed': [1, 2],
}
results = 'results/spell_lr.jsonl'
runs_dir = 'out-study/spell_lr'
