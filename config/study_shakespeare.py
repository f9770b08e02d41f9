# Small-scale study, part A (run by study.sh): Shakespeare in the bytes encoding (V = 257, K = 9 bits)
# and a tiny model that trains in well under a minute on one CPU core. study.sh sets input_code, the
# ablations, seed, code_seed and out_dir per run.
dataset = 'study_shakespeare_bytes'
n_layer = 2
n_head = 4
n_embd = 64
block_size = 64

# 16 x 64 = 1,024 tokens per step, 600 steps = 614,400 tokens (0.6 epoch of the 1.01M train tokens)
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 600
lr_decay_iters = 600
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
weight_decay = 0.1

eval_interval = 50  # the curve in the figure: 10 fixed batches of each split every 50 steps
eval_iters = 10
log_interval = 20
compile = False     # compiling takes longer than these runs
