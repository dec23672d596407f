# Baseline for parcae_140m.py: the naive looped model, u = h + e (Ā = I, marginally stable), trained
# with the prior recipe (per-batch depth, no prelude norm); everything else as Parcae.
#   torchrun --nproc_per_node=8 train.py config/looped_add_140m.py
out_dir = "out-looped-add-140m"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 768
n_head = 6
n_prelude = 2
n_core = 2
n_coda = 2
injection = "add"
# the prior recipe: one depth per batch, no prelude norm
prelude_norm = False
mean_loops = 8
backprop_loops = 4
depth_sampling = "per-batch"
# 256 sequences of 2048 tokens per step: 16 per GPU and micro-step, 16 micro-steps over all GPUs
batch_size = 16
grad_accum_steps = 16
max_iters = 21_400
lr = 8e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 40
eval_loops = [1, 2, 4, 8, 16]
log_interval = 10
