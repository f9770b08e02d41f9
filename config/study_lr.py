# Scale study, step 1 of 3: each input code's learning rate, chosen at one scale (4 layers, 600 steps:
# the model the other two studies share) and scored on the test split, never on val, which the other
# studies report. Rates a factor 2 apart from 1.5e-3; the grid grew upward while a code's best was at
# its edge (finished cells are kept), until 1.2e-2 won for all three, below 2.4e-2. Then write each
# code's rate of lowest mean test loss over the seeds into _learning_rates of config/study_depth.py and
# config/study_data.py (min_lr: a tenth of it), where it stays fixed across scales.
#
#   python sweep.py config/study_lr.py      # 30 runs (5 rates x 3 codes x 2 seeds); time: docs/studies.md
base = 'config/scale.py'
dataset = 'study_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes', '--test_fraction=0.1']
eval_split = 'test'
grid = {
    'input_code': ['fixed_min', 'affine', 'learned'],
    ('learning_rate', 'min_lr'): [(1.5e-3, 1.5e-4), (3e-3, 3e-4), (6e-3, 6e-4), (1.2e-2, 1.2e-3), (2.4e-2, 2.4e-3)],
    'seed': [1, 2],
}
results = 'results/lr.jsonl'
runs_dir = 'out-study/lr'
