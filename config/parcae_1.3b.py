# Parcae at the paper's 1.3b size: d 1536, 12 heads of 128, prelude/core/coda 8/8/8,
# μ_rec 8, μ_bwd 4, on FineWeb-Edu with the GPT-2 tokenizer; the authors' launch recipe for this
# size (MODEL.md section 6): Muon at 8e-3 but AdamW at 6e-3, micro-batches of 8, and activation
# checkpointing, which the release turns on at this size only.
#   python prepare.py --source fineweb-edu --num_shards 14      # all of sample/10BT, ~10B tokens
#   torchrun --nproc_per_node=8 train.py config/parcae_1.3b.py
#   python sample.py --out_dir=out-parcae-1.3b --loops 16
# Token budget: 198,364 steps × 524,288 tokens = 104B tokens (~10 passes over sample/10BT), ~78 per
# parameter of the official 1338.6M model (32k vocabulary; GPT-2's 50k vocabulary adds ~350M embedding
# parameters here, which cost no matmul FLOPs).
out_dir = "out-parcae-1.3b"
data_dir = "data/fineweb-edu"
block_size = 2048
n_embd = 1536
n_head = 12
n_prelude = 8
n_core = 8
n_coda = 8
injection = "parcae"
prelude_norm = True
mean_loops = 8
backprop_loops = 4
depth_sampling = "per-sequence"
activation_checkpoint = True
# 256 sequences of 2048 tokens per step: 8 per GPU and micro-step, 32 micro-steps over all GPUs
batch_size = 8
grad_accum_steps = 32
max_iters = 198_364
lr = 8e-3
adamw_lr = 6e-3
schedule = "trapezoid"
weight_decay = 0.2
eval_interval = 1000
eval_iters = 80                  # 640 sequences, as at 140m and 350m
eval_loops = [1, 2, 4, 8, 16]
log_interval = 10
