# The paper's baseline: plain next-token fine-tuning of Mistral-7B-v0.1 on the same data and
# schedule as config/quietstar_mistral7b.py.
exec(open("config/quietstar_mistral7b.py").read())
mode = "lm"
activation_checkpointing = False
out_dir = "out-lm-mistral7b"
