# A larger model of the paper's family: 24 layers of width 2048 (GPT-3 XL's shape), 1.34B parameters with
# fixed_min or affine, 1.48B with the learned table (+134M). Any input code: --input_code=affine
# --out_dir=out-1b3-affine, or --input_code=learned --out_dir=out-1b3-learned.
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt_1b3.py
# DDP fits (21.5 GB of weights, gradients and AdamW state per GPU; docs/training.md, Larger models, has
# the arithmetic); --parallel=fsdp leaves room for a larger batch_size. The paper's data and token
# budget: 8 sequences x 64 accumulation steps x 1024 tokens = 524,288 tokens per step (any number of
# GPUs dividing 64), 32,500 steps = 17.04B tokens, about 13 hours on 8 H100s at 40% MFU (arithmetic).
# LR 2e-4 as GPT-3 XL (Brown et al. 2020, table 2.1), 750 warmup steps, cosine to 2e-5; the rest of AdamW
# (betas, weight decay 0.1, clipping at 1.0), the logging and the seed are the defaults, as in the paper runs.
input_code = 'fixed_min'
out_dir = 'out-1b3-fixed_min'

dataset = 'fineweb_edu_cosmopedia'
n_layer = 24
n_head = 16
n_embd = 2048
block_size = 1024

batch_size = 8
gradient_accumulation_steps = 64
max_iters = 32500
lr_decay_iters = 32500
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 750

eval_interval = 1000
eval_iters = 100
