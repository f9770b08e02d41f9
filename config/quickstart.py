# A small fixed_min model that trains on a laptop CPU in a few minutes on the corpus that
# `python prepare.py` writes (the CPython documentation topics, bundled 65,536-token tokenizer):
#   python prepare.py && python train.py config/quickstart.py && python sample.py --out_dir=out-quickstart
# Try --input_code=learned or --input_code=affine to compare. With V = 65,536 the output layer
# (128 x 65,536) is most of the model and of the compute.
out_dir = 'out-quickstart'
dataset = 'pydoc'
input_code = 'fixed_min'

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0

batch_size = 8
gradient_accumulation_steps = 1  # 1,024 tokens per step
max_iters = 200
lr_decay_iters = 200
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20

eval_interval = 50
eval_iters = 10
log_interval = 10

device = 'cpu'
compile = False
