# Parcae at the paper's 350m size: d 1024, 8 heads of 128, prelude/core/coda 4/4/4,
# μ_rec 8, μ_bwd 4, on FineWeb-Edu with the GPT-2 tokenizer; the recipe of MODEL.md section 5.
#   python prepare.py --source fineweb-edu --num_shards 14      # all of sample/10BT, ~10B tokens
#   torchrun --nproc_per_node=8 train.py config/parcae_350m.py
#   python sample.py --out_dir=out-parcae-350m --loops 16
# Token budget: 60,000 steps × 524,288 tokens = 31.5B tokens (~3 passes over sample/10BT), ~80 per parameter of the
# official 388M model (32k vocabulary; GPT-2's 50k vocabulary adds ~126M embedding parameters
# here, which cost no matmul FLOPs).
out_dir = "out-parcae-350m"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 1024
n_head = 8
n_prelude = 4
n_core = 4
n_coda = 4
injection = "parcae"
prelude_norm = True
mean_loops = 8
backprop_loops = 4
depth_sampling = "per-sequence"
# 256 sequences of 2048 tokens per step: 16 per GPU and micro-step, 16 micro-steps over all GPUs
batch_size = 16
grad_accum_steps = 16
max_iters = 60_000
lr = 8e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 40
eval_loops = [1, 2, 4, 8, 16]
log_interval = 10
