# Scale study, step 2 of 3: depth. 1, 2, 4 and 8 layers at width 64, 600 steps of 1,024 tokens (614K
# tokens) at every depth, each code at its learning rate from config/study_lr.py, 3 paired seeds;
# the held-out loss on val.
#
#   python sweep.py config/study_depth.py   # 36 runs; time: docs/studies.md

# (learning_rate, min_lr) per code, chosen by config/study_lr.py on the test split (results/lr.jsonl):
# 1.2e-2 had the lowest mean test loss for all three codes, below 6e-3 and 2.4e-2.
# A leading _ keeps a helper name out of the study's keys.
_learning_rates = {'fixed_min': (1.2e-2, 1.2e-3), 'affine': (1.2e-2, 1.2e-3), 'learned': (1.2e-2, 1.2e-3)}

base = 'config/scale.py'
dataset = 'study_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes', '--test_fraction=0.1']
grid = {
    ('input_code', 'learning_rate', 'min_lr'): [(code, *lrs) for code, lrs in _learning_rates.items()],
    'n_layer': [1, 2, 4, 8],
    'seed': [1, 2, 3],
}
results = 'results/depth.jsonl'
runs_dir = 'out-study/depth'
