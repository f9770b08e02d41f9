# Scale study, step 3 of 3: data. The 4-layer model at three token budgets spanning 8x: 100, 300 and
# 800 steps of 1,024 tokens (102K, 307K and 819K tokens; the largest is 0.89 epoch of the train
# split, so no text is read twice on average), warmup and cosine decay scaled to each budget, each
# code at its learning rate from config/study_lr.py, 3 paired seeds; the held-out loss on val.
#
#   python sweep.py config/study_data.py    # 27 runs; time: docs/studies.md

# (learning_rate, min_lr) per code, chosen by config/study_lr.py on the test split (results/lr.jsonl):
# 1.2e-2 had the lowest mean test loss for all three codes, below 6e-3 and 2.4e-2.
# A leading _ keeps a helper name out of the study's keys.
_learning_rates = {'fixed_min': (1.2e-2, 1.2e-3), 'affine': (1.2e-2, 1.2e-3), 'learned': (1.2e-2, 1.2e-3)}

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
