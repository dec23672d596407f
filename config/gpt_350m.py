# The parameter-matched Transformer for parcae_350m.py: the same 12 blocks (4/4/4), each run
# once (injection "none"), with the same data, tokens and optimizer. Parcae at (μ_rec, μ_bwd) = (8, 4)
# costs 2.1× its training FLOPs by model.flops_per_token(): the comparison is at equal parameters and data.
#   torchrun --nproc_per_node=8 train.py config/gpt_350m.py
out_dir = "out-gpt-350m"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 1024
n_head = 8
n_prelude = 4
n_core = 4
n_coda = 4
injection = "none"
# 256 sequences of 2048 tokens per step: 16 per GPU and micro-step, 16 micro-steps over all GPUs
batch_size = 16
grad_accum_steps = 16
max_iters = 60_000
lr = 8e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 40
log_interval = 10
