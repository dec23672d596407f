# The parameter-matched Transformer for parcae_770m.py: the same 18 blocks (6/6/6), each run
# once (injection "none"), with the same data, tokens and optimizer; micro-batches of 32, as the
# authors launch it. Parcae at (μ_rec, μ_bwd) = (8, 4) costs 2.3× its training FLOPs by
# model.flops_per_token(): the comparison is at equal parameters and data.
#   torchrun --nproc_per_node=8 train.py config/gpt_770m.py
out_dir = "out-gpt-770m"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 1280
n_head = 10
n_prelude = 6
n_core = 6
n_coda = 6
injection = "none"
# 256 sequences of 2048 tokens per step: 32 per GPU and micro-step, 8 micro-steps over all GPUs
batch_size = 32
grad_accum_steps = 8
max_iters = 117_493
lr = 8e-3
adamw_lr = 6e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 20                  # 640 sequences, as at 140m and 350m
log_interval = 10
