# Scale study, step 2 of 3: depth. 1, 2, 4 and 8 layers at width 64, 600 steps of 1,024 tokens (614K
# tokens) at every depth, each code at its learning rate from config/study_lr.py, 3 paired seeds;
# the held-out loss on val.
#
#   python sweep.py config/study_depth.py   # 36 runs; 60 to 75 min on 2 cores (README, Results)

# (learning_rate, min_lr) per code: until config/study_lr.py has been run, the old study's for all.
# A leading _ keeps a helper name out of the study's keys.
_learning_rates = {'fixed_min': (3e-3, 3e-4), 'affine': (3e-3, 3e-4), 'learned': (3e-3, 3e-4)}

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
