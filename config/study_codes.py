# Scale study, step 5: the other input codes of model.CODES, on the bytes data of the depth study
# (config/study_depth.py: width 64, 600 steps of 1,024 tokens, 3 paired seeds), at 1 layer, the depth
# where fixed_min's gap to learned was smallest (+0.23%, results/depth.jsonl), and at 4 layers, the
# model the learning rate was chosen on. Every code at 1.2e-2: the rate config/study_lr.py chose for
# fixed_min, affine and learned, and config/study_codes_lr.py for each of the others.
#   fixed_min code_layout=repeat  bit k on adjacent channels, as the paper's released checkpoints
#   gray, permuted                other fixed K-bit codes: the Gray code of the id; a random permutation of ids
#   random_wide code_width=64     random collision-free 64-bit codes (the author's earlier series; its
#                                 256-bit codes need n_embd >= 256, which train.py asks for)
#   learned_lift                  fixed_min's K bits through a trained K x n_embd map (576 parameters here)
#
#   python sweep.py config/study_codes.py   # 48 runs; time: docs/studies.md

base = 'config/scale.py'
dataset = 'study_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes', '--test_fraction=0.1']
grid = {
    ('input_code', 'code_layout', 'code_width'): [
        ('fixed_min', 'tile', 0), ('fixed_min', 'repeat', 0), ('affine', 'tile', 0), ('gray', 'tile', 0),
        ('permuted', 'tile', 0), ('random_wide', 'tile', 64), ('learned_lift', 'tile', 0), ('learned', 'tile', 0)],
    ('learning_rate', 'min_lr'): [(1.2e-2, 1.2e-3)],
    'n_layer': [1, 4],
    'seed': [1, 2, 3],
}
results = 'results/codes.jsonl'
runs_dir = 'out-study/codes'
