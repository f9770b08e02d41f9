# The first study, part A (docs/results.md): Shakespeare in the bytes encoding (V = 257, K = 9
# bits) and a tiny model that trains in well under a minute on one CPU core; the input codes fixed_min,
# affine and learned, and the ablations: {0,1} bits instead of {-1,+1}, code_scale 0.5 and 2, and a
# frozen random Gaussian table (frozen_random: fixed but not minimal); 3 paired seeds each.
#
#   python sweep.py config/study_shakespeare.py    # 21 runs; time: docs/studies.md
#   python report.py --runs='out-study/shakespeare/*' --plot=assets/study_shakespeare.png
base = {
    'n_layer': 2, 'n_head': 4, 'n_embd': 64, 'block_size': 64,
    # 16 x 64 = 1,024 tokens per step, 600 steps = 614,400 tokens (0.6 epoch of the 1.01M train tokens)
    'batch_size': 16, 'gradient_accumulation_steps': 1, 'max_iters': 600, 'lr_decay_iters': 600,
    'learning_rate': 3e-3, 'min_lr': 3e-4, 'warmup_iters': 30, 'weight_decay': 0.1,
    # the curve in the figure: 10 fixed batches of each split every 50 steps
    'eval_interval': 50, 'eval_iters': 10, 'log_interval': 20,
    'compile': False, 'device': 'cpu',  # compiling takes longer than these runs; one core per run
}
dataset = 'study_shakespeare_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes']
grid = {
    ('input_code', 'code_values', 'code_scale'): [
        ('fixed_min', 'bipolar', 1.0), ('affine', 'bipolar', 1.0), ('learned', 'bipolar', 1.0),
        ('fixed_min', 'binary', 1.0), ('fixed_min', 'bipolar', 0.5), ('fixed_min', 'bipolar', 2.0),
        ('frozen_random', 'bipolar', 1.0),
    ],
    'seed': [1, 2, 3],
}
results = 'results/shakespeare.jsonl'
runs_dir = 'out-study/shakespeare'
