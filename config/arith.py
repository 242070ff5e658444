# The classroom run, what `python train.py` does: Quiet-STaR on answer-only arithmetic
# ("3+4*2-5=9", data/arith/) from a tiny base model that saw worked steps in pretraining
# (data/arith/base, made by config/arith_pretrain.py). Every 20 steps it prints what the
# thoughts at '=' carry and the mixing weight there; at the end the trained model with and
# without thinking and the controls, on 1,000 held-out problems (data/arith/report.py; the
# controls that need their own runs: python data/arith/controls.py).
#
# Why the thought slot is fair (issue 14): the thinking must be earned by training, not be
# there at step 0.
# - The delimiters start from <unk>, a symbol that no training or pretraining text contains
#   (tests/test_arith.py checks it): neutral, as the paper's "---" is for arithmetic. The old
#   run started them from '|', the very bars that wrap written steps in pretraining, so the
#   untrained slot read "=|7,4,9|" and scored 91% with the mixing weight forced to 1.
# - The thought length (8) is not the length of the written steps ("7,4,9": 5, with bars 7).
# - Pretraining is unchanged (half the problems show steps as "3+4*2-5=|7,4,9|9"): what the
#   base model knows is plain text; nothing in it is in the slot's format <start> ... <end>.
# With this slot the base model's thoughts still often look like steps (about a quarter begin
# with the right first step, against 1 in 10 by chance), but nothing reads them: with the
# mixing weight forced to 1 the base model scores about 0%. See docs/benchmarks.md for what
# 100 steps make of it (the thinking is not earned at this budget) and what was tried.
# Differences from the paper's run (config/quietstar_mistral7b.py):
init_from = "data/arith/base"   # a 0.8M-parameter model pretrained on arithmetic, not Mistral-7B
data = "data/arith/train"       # answer-only problems, not OpenWebMath
val_data = ""
n_documents = 0
seq_len = 11                    # BOS + one problem + EOS (the paper: 256-token windows)
docs_per_step = 32              # more, shorter documents per step (the paper: 8)
micro_batch_size = 32
n_thought_tokens = 8            # not the length of any written steps (the paper: 9)
n_talk = 1                      # the answer is one symbol (the paper: 4 true tokens after a thought)
n_thoughts = 2                  # as the paper
policy_weight = 1.0             # REINFORCE on the NLL's scale (the paper: 1e6)
embedding_scale = 1.0           # delimiters learn at the common lr (the paper: 100x, at lr 1e-6)
delimiter_init_id = 0           # <unk>, in no text: a neutral start (the paper: '---')
learning_rate = 1e-3            # a tiny model learns fast (the paper: 1e-6 on Mistral-7B)
weight_decay = 1e-3
warmup_steps = 10               # (the paper: 20)
max_steps = 100                 # as the paper
thought_interval = 20           # a sampled thought and the report of 200 training problems' thoughts
save_interval = 100
final_eval = "arith"            # held-out accuracy of the model and the controls at the end
out_dir = "out"
