# Width study, step 1 of 4 (docs/studies.md): the learning rate of fixed_min and learned at widths
# 64, 128 and 256 (2 layers, 4 heads), on both corpora (Shakespeare; two Project Gutenberg novels,
# assets/novels/), each in bytes (600 steps, 614K tokens) and in cl100k_4096 (300 steps, 307K tokens),
# scored on the test split, never on val. Three rates a factor 2 apart per width and code, centred on
# each code's best at width 64 in the scale study (results/lr.jsonl, bpe_lr.jsonl) halved per doubling
# of the width (Adam's usual rate-times-width rule); two seeds, as in the scale study's rate studies.
# Steps 2 to 4 read the rate of lowest test loss at each dataset, width and code from
# results/width_lr.jsonl (studies.chosen_rates, which says in a note when it is at the edge of the
# three: add a rate here and rerun; finished cells are kept). Until this table holds every cell they
# read, each of them is one error naming the cells it lacks.
#
# Added after its first pass: a fourth rate, a factor 4 below the centre, in bytes at width 256, where
# the lowest of the three was best (learned on Shakespeare, both codes on the novels); and a factor 4
# above it in cl100k_4096 for learned at widths 128 and 256 and fixed_min at 256, where the highest was
# best on both corpora (the subword table wants more than the halving per doubling gives).
#
#   python sweep.py config/study_width_lr.py   # 164 runs (docs/studies.md)
_corpora = {'study_bytes': ('assets/tinyshakespeare.txt.gz', 'bytes'),
            'study_novels_bytes': ('assets/novels/', 'bytes'),
            'study_bpe4096': ('assets/tinyshakespeare.txt.gz', 'cl100k_4096'),
            'study_novels_4096': ('assets/novels/', 'cl100k_4096')}
prepare = {name: [f'--input={text}', f'--encoding={encoding}', '--test_fraction=0.1']
           for name, (text, encoding) in _corpora.items()}
_steps = {'bytes': (600, 600, 30), 'cl100k_4096': (300, 300, 20)}  # max_iters, lr_decay_iters, warmup_iters
_centre = {('bytes', 'fixed_min'): 1.2e-2, ('bytes', 'learned'): 1.2e-2,  # the best rate at width 64
           ('cl100k_4096', 'fixed_min'): 6e-3, ('cl100k_4096', 'learned'): 3e-3}
_below, _above = (0.25, 0.5, 1, 2), (0.5, 1, 2, 4)  # the rate factors where the three were not enough
_factors = {('bytes', 256, 'fixed_min'): _below, ('bytes', 256, 'learned'): _below,
            ('cl100k_4096', 128, 'learned'): _above, ('cl100k_4096', 256, 'fixed_min'): _above,
            ('cl100k_4096', 256, 'learned'): _above}
_cells = []
for _dataset, (_text, _encoding) in _corpora.items():
    for _width in (64, 128, 256):
        for (_of, _code), _rate in _centre.items():
            for _factor in _factors.get((_encoding, _width, _code), (0.5, 1, 2)) if _of == _encoding else ():
                _lr = round(_rate * 64 / _width * _factor, 8)
                _cells.append((_dataset, *_steps[_encoding], _width, _code, _lr, round(_lr / 10, 9)))

base = 'config/scale.py'
eval_split = 'test'
grid = {
    ('dataset', 'max_iters', 'lr_decay_iters', 'warmup_iters', 'n_embd', 'input_code', 'learning_rate',
     'min_lr'): _cells,
    'n_layer': [2],
    'seed': [1, 2],
}
results = 'results/width_lr.jsonl'
runs_dir = 'out-study/width_lr'
