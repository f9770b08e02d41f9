# The width study on one GPU, step 1 of 2 (docs/studies.md): the map of config/study_width*.py at
# widths 512, 768 and 1024 (4 layers, head size 64, context 256), 2,000 steps of 32 x 256 tokens (16.4M
# tokens: 18 epochs of Shakespeare's bytes, 8 of the novels'; give a bigger corpus to prepare.py for
# fewer), on both corpora in bytes and cl100k_4096. This step: three rates a factor 2 apart per width
# and code, step 1's three at width 64 scaled by 64 / width, one seed, scored on test.
# Not compiled: a run is seconds of compute, less than compiling takes.
#
#   python sweep.py config/study_gpu_width_lr.py   # 72 runs; time: docs/studies.md (arithmetic)
import runpy

_cpu = runpy.run_path('config/study_width_lr.py')  # its datasets, and its rates at width 64
_corpora, prepare = _cpu['_corpora'], _cpu['prepare']
_cells = []
for _dataset, *_steps, _width, _code, _lr, _min_lr in _cpu['_cells']:
    for _wide in (512, 768, 1024) if _width == 64 else ():
        _scaled = (round(_lr * 64 / _wide, 8), round(_min_lr * 64 / _wide, 9))
        _cells.append((_dataset, _wide, _wide // 64, _code, *_scaled))

base = {
    'n_layer': 4, 'block_size': 256, 'batch_size': 32, 'gradient_accumulation_steps': 1,
    'max_iters': 2000, 'lr_decay_iters': 2000, 'warmup_iters': 100, 'weight_decay': 0.1,
    'eval_interval': 500, 'eval_iters': 20, 'log_interval': 100,
    'device': 'cuda', 'dtype': 'auto', 'compile': False,
}
eval_split = 'test'
grid = {
    ('dataset', 'n_embd', 'n_head', 'input_code', 'learning_rate', 'min_lr'): _cells,
    'seed': [1],
}
jobs = 1  # one GPU
results = 'results/gpu_width_lr.jsonl'
runs_dir = 'out-study/gpu_width_lr'
