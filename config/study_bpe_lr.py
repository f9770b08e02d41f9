# Scale study, step 4a: the learning rate again for the subword vocabulary of config/study_bpe.py
# (cl100k_4096, V = 4,096), at its 4-layer model and 300 steps, scored on the test split, never on
# val: the rate chosen on bytes (1.2e-2, config/study_lr.py) is one of three, a factor 2 apart (and
# 1.5e-3 for learned, whose best was 3e-3, the lowest of the three). With
# permuted (fixed_min of a random permutation of the ids), which config/study_bpe.py adds to ask
# whether fixed_min's gap on BPE comes from the order of the ids. Then write each code's rate of
# lowest mean test loss into _learning_rates of config/study_bpe.py.
#
#   python sweep.py config/study_bpe_lr.py  # 26 runs (3 rates x 4 codes, 1 more for learned, x 2 seeds)
import itertools

base = 'config/scale.py'
dataset = 'study_bpe4096'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=cl100k_4096', '--test_fraction=0.1']
eval_split = 'test'
grid = {
    ('input_code', 'learning_rate', 'min_lr'): [
        (code, *rate) for code, rate in itertools.product(['fixed_min', 'affine', 'permuted', 'learned'],
                                                          [(3e-3, 3e-4), (6e-3, 6e-4), (1.2e-2, 1.2e-3)])
    ] + [('learned', 1.5e-3, 1.5e-4)],
    ('max_iters', 'lr_decay_iters', 'warmup_iters'): [(300, 300, 20)],
    'seed': [1, 2],
}
results = 'results/bpe_lr.jsonl'
runs_dir = 'out-study/bpe_lr'
