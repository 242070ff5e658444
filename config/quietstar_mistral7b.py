# The official Quiet-STaR run (quiet-star-train.py, see the README's table): Mistral-7B-v0.1
# trained for 100 optimizer steps on the first 1,000 OpenWebMath documents, 8 documents a
# step, 256-token windows, 9 thought tokens, 4 talk steps, 2 thoughts per position.
#   python data/openwebmath/prepare.py --n_docs 1000
#   torchrun --standalone --nproc_per_node=8 train.py config/quietstar_mistral7b.py \
#       --init_from=/path/to/Mistral-7B-v0.1
init_from = "Mistral-7B-v0.1"    # the weights' directory (see the README); or pass --init_from=PATH
preset = "mistral-7b"
mode = "quietstar"
data = "data/openwebmath/train"
val_data = ""
n_documents = 1000
seq_len = 256
docs_per_step = 8
micro_batch_size = 1
n_thought_tokens = 9
n_talk = 4
n_thoughts = 2
policy_weight = 1e6
reinforce_temperature = 3.0
base_loss_weight = 0.5
positive_advantage_only = True
embedding_scale = 100.0
delimiter_init_id = 11940       # '▁---'
learning_rate = 1e-6
weight_decay = 1e-3
warmup_steps = 20
max_steps = 100
grad_clip = 1.0
activation_checkpointing = True
ffn_chunks = 4                  # recompute each feed-forward in 4 chunks of tokens inside the checkpointed
                                # block: ~1.4 GiB less per GPU for ~13% more FLOPs (docs/gpu.md); 1 if room
thought_interval = 10
save_interval = 100
final_eval = ""
out_dir = "out-quietstar-mistral7b"
