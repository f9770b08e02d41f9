# The train config of the scale study (config/study_depth.py, study_data.py, study_lr.py run it with
# sweep.py, which sets input_code, seed, code_seed, learning_rate, the depth and the budget per cell):
# Shakespeare in the bytes encoding (V = 257, K = 9 bits) with a test split to choose learning rates
# on, and a model of width 64 that trains at a few steps per second on one CPU core.
dataset = 'study_bytes'
n_layer = 4
n_head = 4
n_embd = 64
block_size = 64

# 16 x 64 = 1,024 tokens per step; 600 steps = 614,400 tokens (0.67 epoch of the 924K train tokens)
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 600
lr_decay_iters = 600
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
weight_decay = 0.1

eval_interval = 100  # train.py's curve: 10 fixed batches of each split; the reported loss is eval.py's full pass
eval_iters = 10
log_interval = 50
compile = False      # compiling takes longer than these runs
device = 'cpu'       # a study's cells run side by side, one core each
