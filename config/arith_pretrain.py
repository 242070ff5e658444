# The base model of the classroom run (config/arith.py): a tiny Mistral-shaped model (0.8M
# parameters, 20-symbol vocabulary) pretrained with plain next-token prediction on
# data/arith/pretrain, where half the problems show their steps ("3+4*2-5=|7,4,9|9") and half
# only the answer, with filler spaces (data/arith/prepare.py). Seeded; its result is shipped
# as data/arith/base (made with OMP_NUM_THREADS=1; other thread counts round differently).
#   python train.py config/arith_pretrain.py && cp -r out-arith-pretrain/ckpt/. data/arith/base/
init_from = "scratch"
preset = "tiny"
mode = "lm"
data = "data/arith/pretrain"
val_data = ""
seq_len = 26              # BOS + a document with steps and filler + EOS (1 in 239,000 is longer: cut)
docs_per_step = 64
micro_batch_size = 64
learning_rate = 3e-3
weight_decay = 1e-1
warmup_steps = 50
max_steps = 4000           # writing the steps right takes ~1200 steps to appear, through filler longer
log_interval = 25
thought_interval = 0
save_interval = 100
out_dir = "out-arith-pretrain"
