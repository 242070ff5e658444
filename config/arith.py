# The classroom run, what `python train.py` does: Quiet-STaR on arithmetic text ("3+4*2-5=9",
# and half the time "3+4*2-5=|7,4,9|9" with its steps; data/arith/) from a tiny base model
# pretrained on the same kind of text (data/arith/base, made by config/arith_pretrain.py).
# Every 20 steps it prints what the thoughts at '=' carry and the mixing weight there; at the
# end the trained model with and without thinking and the controls, on 1,000 held-out problems
# asked for the answer only (data/arith/report.py; the controls that need their own runs:
# python data/arith/controls.py).
#
# Why the thought slot is fair (issue 14): the thinking must be earned by training, not be
# there at step 0.
# - The delimiters start from the filler space, a symbol the text scatters after any symbol 1
#   time in 10 and that means nothing: the toy's "---". Nothing in any text is in the slot's
#   format <start> ... <end>. So an untrained thought is what the model would write next
#   anyway: after "3+4*2-5=" sometimes the steps (a third of untrained thoughts spell them
#   all), else a guess at the answer. Control (a) scores that thinking before training:
#   about 35%, against about 22% without thinking. The old run started the delimiters from
#   '|', the bar that opens written steps, and its untrained slot scored 91%.
# - A thought is 7 symbols: room for "|7,4,9|", the steps between their bars; the answer comes
#   after the thought, from the mixing of the two predictions. (With 8, room for the answer
#   too, the mixing weight at '=' stayed at 0 in the runs tried.)
# - Quiet-STaR trains on new problems of the pretraining kind, as the paper trains on
#   OpenWebMath, worked and plain text. On answer-only text the thoughts, which continue the
#   text, stopped writing steps: from 34% to 12% of them in the first 20 steps.
# - REINFORCE weighs 100 times its natural scale: rewards are proportional to the mixing
#   weight, which is about 0.05 early on. At weight 1 the thoughts did not improve in 200 steps
#   (the same as without REINFORCE).
# What was tried, with numbers: docs/benchmarks.md.
# Differences from the paper's run (config/quietstar_mistral7b.py):
init_from = "data/arith/base"   # a 0.8M-parameter model pretrained on arithmetic, not Mistral-7B
data = "data/arith/train"       # 30,000 new problems of the pretraining kind, not OpenWebMath
val_data = ""
n_documents = 0
seq_len = 26                    # BOS + one problem, its steps and filler + EOS (the paper: 256-token windows)
docs_per_step = 32              # more, shorter documents per step (the paper: 8)
micro_batch_size = 32
n_thought_tokens = 7            # room for the steps between bars, "|7,4,9|" (the paper: 9)
n_talk = 1                      # the answer is one symbol (the paper: 4 true tokens after a thought)
n_thoughts = 2                  # as the paper
policy_weight = 100.0           # REINFORCE strong beside the NLL (the paper: 1e6, at lr 1e-6)
embedding_scale = 1.0           # delimiters learn at the common lr (the paper: 100x, at lr 1e-6)
delimiter_init_id = 19          # the filler space, which means nothing (the paper: '---')
learning_rate = 1e-3            # a tiny model learns fast (the paper: 1e-6 on Mistral-7B)
weight_decay = 1e-3
warmup_steps = 10               # (the paper: 20)
max_steps = 100                 # as the paper
thought_interval = 20           # a sampled thought and the report of 200 training problems' thoughts
save_interval = 100
final_eval = "arith"            # held-out accuracy of the model and the controls at the end
out_dir = "out"
