# The classroom run, what `python train.py` does: Quiet-STaR on answer-only arithmetic
# ("3+4*2-5=9", data/arith/) from a tiny base model that saw worked steps in pretraining
# (data/arith/base, made by config/arith_pretrain.py). Ends with held-out exact accuracy
# with vs without thinking. Differences from the paper's run (config/quietstar_mistral7b.py):
init_from = "data/arith/base"   # a 0.8M-parameter model pretrained on arithmetic, not Mistral-7B
data = "data/arith/train"       # answer-only problems, not OpenWebMath
val_data = ""
n_documents = 0
seq_len = 11                    # BOS + one problem + EOS (the paper: 256-token windows)
docs_per_step = 32              # more, shorter documents per step (the paper: 8)
micro_batch_size = 32
n_thought_tokens = 5            # room for the three steps "7,4,9" (the paper: 9)
n_talk = 1                      # the answer is one symbol (the paper: 4 true tokens after a thought)
n_thoughts = 2                  # as the paper
policy_weight = 1.0             # REINFORCE on the NLL's scale (the paper: 1e6; not tried here)
embedding_scale = 1.0           # delimiters learn at the common lr (the paper: 100x, at lr 1e-6)
delimiter_init_id = 17          # '|', which opens and closes written steps here (the paper: '---')
learning_rate = 1e-3            # a tiny model learns fast (the paper: 1e-6 on Mistral-7B)
weight_decay = 1e-3
warmup_steps = 10               # (the paper: 20)
max_steps = 100                 # 81 s of CPU time in all, evaluation included (as the paper: 100)
thought_interval = 20
save_interval = 100
final_eval = "arith"            # print held-out accuracy with vs without thinking at the end
out_dir = "out"
