# The parameter-matched Transformer for parcae_1.3b.py: the same 24 blocks (8/8/8), each run
# once (injection "none"), with the same data, tokens and optimizer; micro-batches of 16 and no
# activation checkpointing, as the authors launch it. Parcae at (μ_rec, μ_bwd) = (8, 4) costs 2.3×
# its training FLOPs by model.flops_per_token(): the comparison is at equal parameters and data.
#   torchrun --nproc_per_node=8 train.py config/gpt_1.3b.py
out_dir = "out-gpt-1.3b"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 1536
n_head = 12
n_prelude = 8
n_core = 8
n_coda = 8
injection = "none"
# 256 sequences of 2048 tokens per step: 16 per GPU and micro-step, 16 micro-steps over all GPUs
batch_size = 16
grad_accum_steps = 16
max_iters = 198_364
lr = 8e-3
adamw_lr = 6e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 40
log_interval = 10
