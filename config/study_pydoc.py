# The first study, part B (docs/results.md): the paper's vocabulary, V = 65,536 (K = 16 bits), on
# the offline quickstart corpus (python prepare.py: CPython's docs, 94K train / 13K val tokens). The
# same tiny model as part A: at this V the 64 x 65,536 lm_head (and the learned input table) dominate,
# so a run is CPU-bound at a few hundred tokens per second. fixed_min, affine, learned; 3 paired seeds.
#
#   python sweep.py config/study_pydoc.py    # 9 runs; time: docs/studies.md
#   python report.py --runs='out-study/pydoc/*' --plot=assets/study_pydoc.png
base = {
    'n_layer': 2, 'n_head': 4, 'n_embd': 64, 'block_size': 64,
    # 8 x 64 = 512 tokens per step, 100 steps = 51,200 tokens (0.54 epoch of the train split)
    'batch_size': 8, 'gradient_accumulation_steps': 1, 'max_iters': 100, 'lr_decay_iters': 100,
    'learning_rate': 3e-3, 'min_lr': 3e-4, 'warmup_iters': 10, 'weight_decay': 0.1,
    'eval_interval': 20, 'eval_iters': 4, 'log_interval': 10,
    'compile': False, 'device': 'cpu',
}
dataset = 'study_pydoc'
prepare = []  # no --input: CPython's documentation in the bundled 65,536-token encoding
grid = {
    'input_code': ['fixed_min', 'affine', 'learned'],
    'seed': [1, 2, 3],
}
results = 'results/pydoc.jsonl'
runs_dir = 'out-study/pydoc'
