# A larger model of the paper's family: 32 layers of width 4096 (GPT-3 6.7B's shape), 6.71B parameters with
# fixed_min or affine, 6.98B with the learned table (+268M). Any input code: --input_code=affine
# --out_dir=out-7b-affine, or --input_code=learned --out_dir=out-7b-learned.
#   torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 train.py config/gpt_7b.py
# FSDP, because DDP cannot fit it: weights, gradients and AdamW state are 107 GB per GPU under DDP,
# 13.4 GB on 8 GPUs and 6.7 GB on 16 under FSDP (docs/training.md, Larger models, has the arithmetic).
# Activation checkpointing keeps the activations of a 4-sequence micro-batch near 1.6 GB instead of 18.
# The paper's data and token budget: 4 sequences x 256 accumulation steps x 1024 tokens = 1,048,576
# tokens per step (any number of GPUs dividing 256), 16,250 steps = 17.04B tokens, about 63 hours on 8
# H100s or 31 on 16 at 40% MFU, before the recomputation (arithmetic).
# LR 1.2e-4 as GPT-3 6.7B (Brown et al. 2020, table 2.1), 375 warmup steps, cosine to 1.2e-5; the rest of
# AdamW (betas, weight decay 0.1, clipping at 1.0), the logging and the seed are the defaults.
input_code = 'fixed_min'
out_dir = 'out-7b-fixed_min'
parallel = 'fsdp'
activation_checkpointing = True

dataset = 'fineweb_edu_cosmopedia'
n_layer = 32
n_head = 32
n_embd = 4096
block_size = 1024

batch_size = 4
gradient_accumulation_steps = 256
max_iters = 16250
lr_decay_iters = 16250
learning_rate = 1.2e-4
min_lr = 1.2e-5
warmup_iters = 375

eval_interval = 500
eval_iters = 100
