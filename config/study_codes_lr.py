# Scale study, step 5a: the learning rate of each of the other codes of config/study_codes.py, chosen
# as config/study_lr.py chose it for fixed_min, affine and learned (4 layers, 600 steps, 2 seeds,
# scored on the test split, never on val): 1.2e-2, that study's winner, and a factor 2 either side.
# Then write each code's rate of lowest mean test loss into _learning_rates of config/study_codes.py.
#
#   python sweep.py config/study_codes_lr.py   # 30 runs (5 codes x 3 rates x 2 seeds); time: docs/studies.md
import itertools

base = 'config/scale.py'
dataset = 'study_bytes'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes', '--test_fraction=0.1']
eval_split = 'test'
grid = {
    ('input_code', 'code_layout', 'code_width', 'learning_rate', 'min_lr'): [
        (*code, *rate) for code, rate in itertools.product(
            [('fixed_min', 'repeat', 0), ('gray', 'tile', 0), ('permuted', 'tile', 0), ('random_wide', 'tile', 64),
             ('learned_lift', 'tile', 0)],
            [(6e-3, 6e-4), (1.2e-2, 1.2e-3), (2.4e-2, 2.4e-3)])],
    'seed': [1, 2],
}
results = 'results/codes_lr.jsonl'
runs_dir = 'out-study/codes_lr'
