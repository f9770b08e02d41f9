# The paper's baseline: the usual trainable 65,536 x 1024 input embedding table (67,108,864 more
# trainable parameters). Identical to fixed_min.py and affine_recoded.py but for input_code.
#   torchrun --standalone --nproc_per_node=8 train.py config/learned_baseline.py
# Data: python prepare.py --hf=fineweb-edu+cosmopedia  (writes data/fineweb_edu_cosmopedia: V = 65,536, 17B tokens).
# Global batch: 16 sequences x 32 accumulation steps x 1024 tokens = 524,288 tokens per step (any
# number of GPUs dividing 32). Budget: 32,500 steps = 17.04B tokens. LR: 1,000 warmup steps to 3e-4,
# cosine decay to 3e-5 at the last step; AdamW (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0.
input_code = 'learned'
out_dir = 'out-learned'

dataset = 'fineweb_edu_cosmopedia'
n_layer = 32
n_head = 32
n_embd = 1024
block_size = 1024

batch_size = 16
gradient_accumulation_steps = 32
max_iters = 32500
lr_decay_iters = 32500
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 1000
eval_iters = 100
log_interval = 10
seed = 1337
