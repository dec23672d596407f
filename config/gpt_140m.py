# The parameter-matched Transformer for parcae_140m.py: the same 6 blocks (2/2/2), each run
# once (injection "none"), with the same data, tokens and optimizer. Parcae at (μ_rec, μ_bwd) = (8, 4)
# costs 1.9× its training FLOPs by model.flops_per_token(): the comparison is at equal parameters and data.
#   torchrun --nproc_per_node=8 train.py config/gpt_140m.py
out_dir = "out-gpt-140m"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 768
n_head = 6
n_prelude = 2
n_core = 2
n_coda = 2
injection = "none"
# 256 sequences of 2048 tokens per step: 16 per GPU and micro-step, 16 micro-steps over all GPUs
batch_size = 16
grad_accum_steps = 16
max_iters = 21_400
lr = 8e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 40
log_interval = 10
