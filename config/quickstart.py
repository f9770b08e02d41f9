# The quickstart: a small fixed_min model on Tiny Shakespeare (bundled) in the bytes encoding
# (V = 257, so K = 9 bits, 0 trainable input parameters), a few minutes on a CPU:
#   python train.py config/quickstart.py       # makes data/shakespeare first when it is missing (prepare, below)
#   python sample.py --out_dir=out-quickstart --start="ROMEO:"
# The shape and schedule are nanoGPT's CPU recipe for shakespeare_char (4 layers, 4 heads, width 128,
# context 64, batch 12), so the two can be compared side by side. Try --input_code=learned or affine.
out_dir = 'out-quickstart'
dataset = 'shakespeare'
prepare = ['--input=assets/tinyshakespeare.txt.gz', '--encoding=bytes']  # how train.py makes it when it is missing
input_code = 'fixed_min'

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0

batch_size = 12
gradient_accumulation_steps = 1  # 768 tokens per step
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99  # nanoGPT's choice for small runs with few tokens per step

eval_interval = 500
eval_iters = 20
log_interval = 50

device = 'cpu'
compile = False
