# Scale study, step 4: a subword vocabulary. Shakespeare in cl100k_4096 (the bundled tokenizer's first
# 4,095 merge ranks plus <|endoftext|>: V = 4,096 = 2^12, K = 12 bits, 2.68 bytes per token), 1, 2 and
# 4 layers at width 64, 300 steps of 1,024 tokens (307K tokens: 0.89 epoch of the 345K train tokens,
# about the text of the bytes studies' 800 steps), each code at its learning rate chosen for this
# vocabulary by config/study_bpe_lr.py, 3 paired seeds; the held-out loss on val. permuted is
# fixed_min of a random permutation of the ids: is fixed_min's gap here the order of BPE's ids?
# The learned table is 4,096 x 64 = 262K parameters here, more than the 4-layer decoder's 197K.
#
#   python sweep.py config/study_bpe.py     # 36 runs; time: docs/studies.md

# (learning_rate, min_lr) per code, chosen by config/study_bpe_lr.py on the test split
# (results/bpe_lr.jsonl): the lowest mean test loss of 3e-3, 6e-3 and 1.2e-2 (and 1.5e-3 for learned).
# A leading _ keeps a helper name out of the study's keys.
_learning_rates = {'fixed_min': (6e-3, 6e-4), 'affine': (6e-3, 6e-4), 'permuted': (6e-3, 6e-4),
                   'learned': (3e-3, 3e-4)}

base = 'config/scale.py'
dataset = 'study_bpe4096'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=cl100k_4096', '--test_fraction=0.1']
grid = {
    ('input_code', 'learning_rate', 'min_lr'): [(code, *lrs) for code, lrs in _learning_rates.items()],
    'n_layer': [1, 2, 4],
    ('max_iters', 'lr_decay_iters', 'warmup_iters'): [(300, 300, 20)],
    'seed': [1, 2, 3],
}
results = 'results/bpe.jsonl'
runs_dir = 'out-study/bpe'
