# Scale study, step 3 of 3: data. The 4-layer model at three token budgets spanning 8x: 100, 300 and
# 800 steps of 1,024 tokens (102K, 307K and 819K tokens; the largest is 0.89 epoch of the train
# split, so no text is read twice on average), warmup and cosine decay scaled to each budget, each
# code at its learning rate from config/study_lr.py, 3 paired seeds; the held-out loss on val.
#
#   python sweep.py config/study_data.py    # 27 runs; 30 to 35 min on 2 cores (README, Results)

# (learning_rate, min_lr) per code: until config/study_lr.py has been run, the old study's for all.
# A leading _ keeps a helper name out of the study's keys.
_learning_rates = {'fixed_min': (3e-3, 3e-4), 'affine': (3e-3, 3e-4), 'learned': (3e-3, 3e-4)}

base = 'config/scale.py'
dataset = 'study_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes', '--test_fraction=0.1']
grid = {
    ('input_code', 'learning_rate', 'min_lr'): [(code, *lrs) for code, lrs in _learning_rates.items()],
    ('max_iters', 'lr_decay_iters', 'warmup_iters'): [(100, 100, 10), (300, 300, 20), (800, 800, 40)],
    'seed': [1, 2, 3],
}
results = 'results/data.jsonl'
runs_dir = 'out-study/data'
