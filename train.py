r"""
Quiet-STaR training, in one readable loop, from one CPU to many GPUs.

    python train.py                          # the defaults: a tiny model learns to think (CPU, minutes)
    python train.py --max_steps=200          # the same run, only longer
    python train.py config/math.py           # a 9M model from scratch on a small math corpus
    python train.py config/quietstar_mistral7b.py --init_from=/path/to/Mistral-7B-v0.1
    torchrun --standalone --nproc_per_node=8 train.py config/quietstar_mistral7b.py \
        --init_from=/path/to/Mistral-7B-v0.1                        # 8 GPUs, FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=10.0.0.1 \
        --master_port=29500 train.py config/quietstar_mistral7b.py ...  # and node_rank=1 on the other
    python train.py --init_from=resume --out_dir=out                # continue where it stopped

Settings are the fields of TrainConfig below (`python train.py --help` lists them). Override
them with config files (Python files of plain assignments, see config/) and then with
--name=value (or --name value) arguments; both are type- and range-checked, and the final
settings are saved with every checkpoint. Checkpoints rotate safely (see checkpoint.py); a
fresh run refuses an out_dir that holds one (--init_from=resume, or --overwrite=True).

One optimizer step: the step's documents (docs_per_step, the same whatever the number of
processes) are split into micro-batches; for each, thoughts are sampled without gradient,
then the Quiet-STaR loss is computed and backpropagated; gradients are averaged over
micro-batches and processes, clipped, and AdamW steps. mode=lm does plain next-token
fine-tuning on the same data instead (the paper's baseline).
"""

import atexit
import json
import math
import os
import resource
import signal
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
from cli import (check_device, check_dtype, check_range, make_settings, read_overrides, run,
                 settings_help)
from dataloader import Batches, Documents, check_token_ids
from model import PEAK_BF16_FLOPS, PRESETS, ModelArgs, Transformer, read_config
from quietstar import QuietStar, QuietStarConfig, quietstar_loss, step_flops
from tokenizer import check_vocabulary, load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # The defaults are what a bare `python train.py` runs: the arithmetic demo (a tiny model
    # that learns to think on a CPU in minutes). Each comment says why it differs from the
    # paper's run (config/quietstar_mistral7b.py); other runs are config files (config/).
    # what to train, from where, to where
    init_from: str = "data/arith/base"   # a checkpoint dir, "scratch" (a preset) or "resume"; the paper: Mistral-7B
    preset: str = "tiny"             # model preset for init_from=scratch (see model.PRESETS)
    mode: str = "quietstar"          # "quietstar", or "lm" for plain next-token fine-tuning
    out_dir: str = "out"             # where ckpt/ and metrics.jsonl go
    # data (see dataloader.py); data/arith and data/math are prepared automatically on first use
    data: str = "data/arith/train"   # path prefix of NAME.bin + NAME.idx.npy; arithmetic text, not OpenWebMath
    val_data: str = ""               # validation loss data (with eval_interval)
    n_documents: int = 0             # use only the first N documents (0: all); the paper: 1000
    seq_len: int = 26                # BOS + one problem, its steps and filler + EOS (the paper: 256-token windows)
    docs_per_step: int = 32          # documents per optimizer step: more, shorter ones (the paper: 8)
    micro_batch_size: int = 32       # documents per forward/backward on one process
    seed: int = 42                   # data order, thoughts and new weights
    # Quiet-STaR (see quietstar.py); the paper: 9 thought tokens, 4 talk steps, 2 thoughts
    n_thought_tokens: int = 7        # room for the steps between bars, "|7,4,9|" (the paper: 9)
    n_talk: int = 1                  # the answer is one symbol (the paper: 4)
    n_thoughts: int = 2              # as the paper
    policy_weight: float = 100.0     # REINFORCE strong beside the NLL (the paper: 1e6, at lr 1e-6)
    reinforce_temperature: float = 3.0   # as the paper
    base_loss_weight: float = 0.5    # as the paper
    positive_advantage_only: bool = True   # as the paper
    embedding_scale: float = 1.0     # delimiters learn at the common lr (the paper: 100x, at lr 1e-6)
    delimiter_init_id: int = 19      # token whose embedding starts <start> and <end>: the filler space (the paper: '---')
    # optimisation: AdamW on every parameter (weight decay too, as the official run)
    learning_rate: float = 1e-3      # a tiny model learns fast (the paper: 1e-6 on Mistral-7B)
    weight_decay: float = 1e-3       # as the paper
    beta1: float = 0.9               # AdamW betas, as the paper
    beta2: float = 0.999             # as the paper
    warmup_steps: int = 10           # linear warm-up, then constant (the paper: 20)
    max_steps: int = 100             # as the paper
    grad_clip: float = 1.0           # as the paper
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"   # cpu, cuda, cuda:N or mps
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype (float32, bfloat16, float16)
    pure_bf16: bool = False          # bf16 weights and optimizer state, as the official run
    fsdp: bool = True                # with several processes: FSDP2 if True, else DDP
    activation_checkpointing: bool = False   # recompute activations in backward (less memory)
    ffn_chunks: int = 1              # with checkpointing: recompute each feed-forward in N chunks of tokens (docs/gpu.md)
    compile: bool = False            # torch.compile each transformer block (for GPU runs; needs a compiler)
    # logging and checkpoints
    log_interval: int = 1            # print and log a step line every N steps
    thought_interval: int = 20       # show one sampled thought (and the arithmetic run's thought report) every N steps
    eval_interval: int = 0           # validation loss every N steps (0: never)
    eval_batches: int = 4            # micro-batches of val_data per validation loss
    eval_paper_examples: int = 0     # with eval_interval: the paper's GSM8K/CSQA metric on N examples
    save_interval: int = 100         # save every N steps (and at the last step)
    overwrite: bool = False          # a fresh run may replace a checkpoint already in out_dir
    final_eval: str = "arith"        # "arith": held-out accuracy of the model and the controls at the end ("": none)
    final_eval_problems: int = 0     # with final_eval: the first N held-out problems (0: all 1,000)
    wandb_project: str = ""          # log to Weights & Biases when set (and wandb is installed)


# -----------------------------------------------------------------------------
# settings: defaults <- config files <- --name=value

def parse_config(argv):
    """TrainConfig from config files and --name=value arguments, type- and range-checked."""
    if "--help" in argv or "-h" in argv:
        print(settings_help(TrainConfig, __doc__))
        sys.exit(0)
    return check_settings(make_settings(TrainConfig, read_overrides(argv)))


def check_settings(cfg):
    """Every setting in its allowed range, with the range in the message."""
    for name in ("seq_len", "docs_per_step", "micro_batch_size", "n_thought_tokens", "n_talk",
                 "n_thoughts", "max_steps", "log_interval", "save_interval", "eval_batches", "ffn_chunks"):
        check_range(name, getattr(cfg, name), 1)
    for name in ("n_documents", "warmup_steps", "thought_interval", "eval_interval",
                 "eval_paper_examples", "final_eval_problems", "weight_decay", "policy_weight"):
        check_range(name, getattr(cfg, name), 0)
    check_range("learning_rate", cfg.learning_rate, 0, 1e30)    # torch refuses > 3.4e38
    for name in ("grad_clip", "reinforce_temperature", "embedding_scale"):
        check_range(name, getattr(cfg, name), 0, low_open=True)
    check_range("base_loss_weight", cfg.base_loss_weight, 0, 1)
    check_range("beta1", cfg.beta1, 0, 0.999999)
    check_range("beta2", cfg.beta2, 0, 0.999999)
    if cfg.mode == "quietstar":
        check_range("seq_len", cfg.seq_len, cfg.n_talk + 1)
    if cfg.docs_per_step % cfg.micro_batch_size:
        raise SystemExit(f"docs_per_step={cfg.docs_per_step} must be a multiple of "
                         f"micro_batch_size={cfg.micro_batch_size}")
    if cfg.mode not in ("quietstar", "lm"):
        raise SystemExit(f"mode={cfg.mode!r}: expected 'quietstar' or 'lm'")
    if cfg.preset not in PRESETS:
        raise SystemExit(f"preset={cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    check_dtype(cfg.dtype)
    check_device(cfg.device)
    return cfg


# -----------------------------------------------------------------------------
# processes, model, optimizer

def setup_distributed(cfg):
    """-> (rank, world_size, device). One process unless launched by torchrun."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, cfg.device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if cfg.device.startswith("cuda") else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, device


def quietstar_config(cfg):
    return QuietStarConfig(n_thought_tokens=cfg.n_thought_tokens, n_talk=cfg.n_talk,
                           n_thoughts=cfg.n_thoughts, policy_weight=cfg.policy_weight,
                           reinforce_temperature=cfg.reinforce_temperature,
                           base_loss_weight=cfg.base_loss_weight,
                           positive_advantage_only=cfg.positive_advantage_only,
                           embedding_scale=cfg.embedding_scale,
                           delimiter_init_id=cfg.delimiter_init_id)


def load_model(cfg, source, rank, device, fsdp, tokenizer):
    """
    The model to train (QuietStar, or a plain Transformer for mode=lm), in float32 (or
    bfloat16 with pure_bf16). With FSDP only rank 0 reads the checkpoint: the others build an
    empty model and receive their shards from it (see shard_model).
    """
    dtype = torch.bfloat16 if cfg.pure_bf16 else torch.float32
    load_here = not fsdp or rank == 0
    where = "cpu" if fsdp else device
    if source == "scratch":
        torch.manual_seed(cfg.seed)                       # same initial weights on every process
        n_words = tokenizer.n_words                       # + the two delimiters for Quiet-STaR
        args = ModelArgs.from_name(cfg.preset, vocab_size=n_words + 2 if cfg.mode == "quietstar" else n_words)
        with torch.device(where if load_here else "meta"):
            model = Transformer(args)
            if cfg.mode == "quietstar":
                model = QuietStar(model, quietstar_config(cfg))
        if cfg.mode == "quietstar" and load_here:
            model.init_thought_parameters()
        return model.to(dtype)
    if cfg.mode == "lm":
        if load_here:
            return Transformer.from_pretrained(source, device=where, dtype=dtype)
        with torch.device("meta"):
            return Transformer(read_config(source)[0])
    if load_here:
        torch.manual_seed(cfg.seed)                       # the two new vocabulary rows
        return QuietStar.from_pretrained(source, quietstar_config(cfg), device=where, dtype=dtype)
    args = read_config(source)[0]
    if args.vocab_size == tokenizer.n_words:              # a plain model: the delimiters are added
        args.vocab_size += 2
    with torch.device("meta"):
        return QuietStar(Transformer(args), quietstar_config(cfg))


def blocks_of(model):
    return (model.model if isinstance(model, QuietStar) else model).layers


def shard_model(model, cfg, rank, device):
    """FSDP2: shard every transformer block, the embedding, the output layer, then the rest;
    rank 0's weights are broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    full_state = model.state_dict() if rank == 0 else {}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.dtype == "bfloat16" and not cfg.pure_bf16 else MixedPrecisionPolicy()
    inner = model.model if isinstance(model, QuietStar) else model
    # the blocks, and the embedding and output layer on their own: gathered only while used
    # (in the root's group they stayed gathered from the first forward to the end of the
    # backward: 0.4 GiB per GPU at 7B)
    for module in [*blocks_of(model), inner.tok_embeddings, inner.output]:
        fully_shard(module, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if isinstance(model, QuietStar):
        register_fsdp_forward_method(model, "sample_thoughts")
    return model


def checkpoint_with_grad(function, *args, **kwargs):
    """torch.utils.checkpoint when there is a backward to recompute for; a plain call without
    gradient (sampling thoughts), where checkpointing saves nothing and, compiled, its
    higher-order op refused the sampling's caches (a graph break at every block)."""
    from torch.utils.checkpoint import checkpoint
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def enable_activation_checkpointing(model, ffn_chunks=1):
    """Recompute each block's activations in the backward pass instead of storing them. With
    ffn_chunks > 1 the block's own backward is made leaner too: its feed-forward sublayer
    (norm and SwiGLU) is checkpointed again in that many chunks of tokens, so it holds one
    chunk's 14,336-wide intermediates at a time, and the attention's norm is checkpointed,
    so its float32 copies are not kept (the forward runs once more: ~+1/6 of the FLOPs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    layers = blocks_of(model)
    for i, block in enumerate(layers):
        if ffn_chunks > 1:
            block.ffn_chunks = ffn_chunks
            block.ffn = types.MethodType(ffn_in_chunks, block)
            block.attention_norm = checkpoint_wrapper(block.attention_norm, checkpoint_fn=checkpoint_with_grad)
        layers[i] = checkpoint_wrapper(block, checkpoint_fn=checkpoint_with_grad)


def ffn_in_chunks(block, h):
    """TransformerBlock.ffn (ffn_norm, then the feed-forward) on h (B, T, d) as block.ffn_chunks
    checkpointed chunks of tokens (it is token-wise). A method bound to each block, not a
    closure: compiled blocks then share one graph (closures differ per block: recompiles)."""
    ffn = type(block).ffn
    if not torch.is_grad_enabled() or h.shape[1] < block.ffn_chunks:
        return ffn(block, h)
    return torch.cat([checkpoint_with_grad(ffn, block, part) for part in h.chunk(block.ffn_chunks, dim=1)], dim=1)


def autocast_context(device_type, cfg, fsdp):
    """bf16 autocast for fp32 master weights on one GPU or DDP (FSDP2 casts with its
    mixed-precision policy instead). micro_step enters it twice, for sampling and for the
    forward: its cache of bf16 weight copies is dropped at each exit, so no cast made while
    sampling is kept into the forward (there, made with gradient tracking, the casts would be
    the graph's oldest nodes and hold every block's weight gradient to the end of the backward)."""
    if cfg.dtype != "bfloat16" or cfg.pure_bf16 or fsdp:
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


@torch.no_grad()
def clip_gradients(model, max_norm, fsdp):
    """Scale all gradients so that their global norm is at most max_norm; returns the norm.
    The sum of squares is accumulated in float64: in float32 the many tiny gradients of the
    32002-wide output layer get lost (measured: 3e-4 of the squared norm), and the result then
    depends on how the parameters are sharded. Returns the norm as a 0-d tensor (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    total = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in local)
    if fsdp:                                   # every process holds a shard of every gradient
        dist.all_reduce(total)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm


def learning_rate(cfg, step):
    return cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


# -----------------------------------------------------------------------------
# one micro-batch

def sample_thoughts(model, tokens, valid, doc_ids, cfg, step):
    """Thoughts for a micro-batch, each document's from its own seeded generator, so that the
    samples do not depend on how documents are split over micro-batches and processes."""
    generators = [torch.Generator(device=tokens.device).manual_seed(hash((cfg.seed, step, d)) % 2**63)
                  for d in doc_ids]
    return model.sample_thoughts(tokens, valid, generator=generators)


def micro_step(model, wrapped, tokens, valid, doc_ids, cfg, step, autocast=nullcontext()):
    """-> (loss, metrics, tokens processed) for one micro-batch. autocast (autocast_context)
    is entered once for the sampling and again for the forward, so that no cast made while
    sampling is kept for the forward and its backward."""
    B, L = tokens.shape
    if cfg.mode == "lm":
        with autocast:
            logits = wrapped(tokens)
        ok = valid[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][ok], tokens[:, 1:][ok])
        return loss, {"loss": loss.item(), "nll_base": loss.item()}, B * L
    with autocast:
        thoughts = sample_thoughts(model, tokens, valid, doc_ids, cfg, step)
    with autocast:
        out = wrapped(tokens, thoughts, valid)
    loss, metrics = quietstar_loss(out, tokens, thoughts, valid, model.config)
    if cfg.final_eval == "arith":        # one problem per row: w where the answer is predicted
        from data.arith.report import answer_mix_weight
        metrics["mix_weight_answer"] = answer_mix_weight(out, valid)
    c = model.config
    processed = B * L * (2 + c.n_thoughts * (c.branch_len + c.n_thought_tokens))   # sampling too
    return loss, metrics, processed


def average_metrics(per_micro, world_size):
    """Mean over micro-batches and processes (min/max for *_min/*_max)."""
    names = sorted(per_micro[0])
    local = {n: [m[n] for m in per_micro] for n in names}
    out = {}
    for n in names:
        if n.endswith("_max"):
            value, op = max(local[n]), dist.ReduceOp.MAX if world_size > 1 else None
        elif n.endswith("_min"):
            value, op = min(local[n]), dist.ReduceOp.MIN if world_size > 1 else None
        else:
            value, op = sum(local[n]) / len(local[n]), dist.ReduceOp.SUM if world_size > 1 else None
        if op is not None:
            t = torch.tensor([value], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            value = t.item() / (world_size if op == dist.ReduceOp.SUM else 1)
        out[n] = value
    return out


# -----------------------------------------------------------------------------
# checkpoints (see checkpoint.py): out_dir/ckpt, rotated so that a kill never loses one

def resume_settings(argv):
    """For init_from=resume: the saved settings, with this command line's overrides on top,
    the step of the newest complete checkpoint (an interrupted save is finished first) and
    the run's id."""
    overrides = read_overrides(argv)
    out_dir = make_settings(TrainConfig, dict(overrides)).out_dir
    state = checkpoint.resume_state(out_dir, master=int(os.environ.get("RANK", 0)) == 0)
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in state["config"].items() if k in known}
    cfg = check_settings(make_settings(TrainConfig, {**saved, **overrides, "init_from": "resume"}))
    return cfg, state["step"], str(state.get("run_id", ""))


# -----------------------------------------------------------------------------

def stop_non_finite(step, what, cfg, master):
    """Stop before the optimizer step (or before saving non-finite weights), so the last
    checkpoint stays the last good one. step counts from 1, as the console."""
    if master:
        found = checkpoint.newest(cfg.out_dir) if os.path.isdir(cfg.out_dir) else None
        kept = f"the last good checkpoint, {found[0]} (step {found[1]}), is untouched" if found \
            else "no checkpoint was written"
        print(f"step {step}: non-finite {what}; stopping without saving ({kept})", flush=True)
    sys.exit(1)


def install_signal_handlers(stop, master, out_dir):
    """SIGINT/SIGTERM: say so at once, finish the step, save, exit; a second one stops at once
    (a kill at any instant is safe for the checkpoints, see checkpoint.py)."""
    def on_signal(signum, frame):
        if stop["signal"] is not None:
            if master:
                found = checkpoint.newest(out_dir)
                os.write(sys.stdout.fileno(), ("stopped at once, without saving; " + (
                    f"the last checkpoint is {found[0]} (step {found[1]})" if found
                    else "no checkpoint was written") + "\n").encode())
            os._exit(130)
        stop["signal"] = signum
        if master:
            os.write(sys.stdout.fileno(), (
                f"\n{signal.Signals(signum).name}: finishing step {stop['step']}, then saving; "
                f"press Ctrl-C again to stop without saving\n").encode())
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def resolve_source(init_from):
    """init_from as a path: 'scratch', an existing directory, else as data_path resolves it."""
    return init_from if init_from == "scratch" or os.path.isdir(init_from) else data_path(init_from)


def run_origin(cfg, source):
    """What the run started from at step 0 (kept in state.json across resumes): the base
    model of the arithmetic run's final controls."""
    if cfg.init_from != "resume":
        return cfg.init_from
    with open(os.path.join(source, "state.json")) as f:
        return json.load(f)["config"].get("init_from", "resume")


def data_path(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def check_not_empty(documents):
    """A data file whose documents hold no token would train on padding only (a NaN loss)."""
    if len(documents.tokens) == 0:
        raise SystemExit(f"{documents.bin_file}: holds 0 tokens ({len(documents)} empty "
                         f"document(s)); nothing to train on")
    return documents


def show_thought(model, tokenizer, tokens, valid, cfg, step):
    """Print the text around one position with the thought sampled there."""
    thoughts = sample_thoughts(model, tokens[:1], valid[:1], [0], cfg, step)
    i = max(0, int(valid[0].sum()) - 1 - cfg.n_talk)     # the last position with all its talk targets
    before = tokenizer.decode(tokens[0, max(0, i - 24):i + 1].tolist())
    after = tokenizer.decode(tokens[0, i + 1:i + 1 + cfg.n_talk].tolist())
    thought = tokenizer.decode(thoughts[0, 0, i].tolist())
    print(f"  thought: ...{before!r} <|startthought|>{thought!r}<|endthought|> {after!r}...")


@torch.no_grad()
def validation_loss(model, wrapped, cfg, step, val_batches):
    model.eval()
    losses = [micro_step(model, wrapped, *val_batches.micro_batch(k, 0), cfg, step)[1]["loss"]
              for k in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def paper_metric_during_training(model, tokenizer, cfg):
    """The official in-training evaluation (the source of the paper's curves): evaluate.py's
    expected probability of the gold answer, with thinking, on the first N examples."""
    import evaluate
    from types import SimpleNamespace
    settings = SimpleNamespace(batch_size=cfg.micro_batch_size, max_length=256, seed=cfg.seed)
    model.eval()
    scores = {}
    for task in ("gsm8k", "csqa"):
        examples = evaluate.load_examples(task, os.path.join(HERE, "data"))[:cfg.eval_paper_examples]
        scores[f"eval_{task}_paper"] = evaluate.paper_metric(model, tokenizer, task, examples, settings, True)[0]
    model.train()
    return scores


def main(argv):
    cfg = parse_config(argv)
    start_step, run_id = 0, os.urandom(4).hex()    # the id ties a run's metrics to its checkpoints
    if cfg.init_from == "resume":
        cfg, start_step, run_id = resume_settings(argv)
        if start_step >= cfg.max_steps:
            print(f"{cfg.out_dir}: this run is finished (its checkpoint is at step {start_step}, "
                  f"max_steps={cfg.max_steps}); to train on, resume with --max_steps=N, N > {start_step}")
            return
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    fsdp = cfg.fsdp and world_size > 1
    if cfg.docs_per_step % (cfg.micro_batch_size * world_size):
        raise SystemExit(f"docs_per_step={cfg.docs_per_step} must be a multiple of "
                         f"micro_batch_size x processes = {cfg.micro_batch_size * world_size}")
    created_out_dir = not os.path.exists(cfg.out_dir)
    checkpoint.refuse_used_out_dir(cfg.out_dir, cfg.init_from == "resume", cfg.overwrite)

    # data
    if master:
        from data.math.prepare import ensure_prepared
        from data.arith.prepare import ensure_prepared as ensure_arith_prepared
        ensure_prepared(cfg.data, cfg.val_data if cfg.eval_interval else "")
        ensure_arith_prepared(cfg.data, cfg.val_data if cfg.eval_interval else "")
    if world_size > 1:
        dist.barrier()
    n_micro = cfg.docs_per_step // cfg.micro_batch_size // world_size   # micro-batches per process and step
    documents = check_not_empty(Documents(data_path(cfg.data)))
    batches = Batches(documents, cfg.seq_len, cfg.docs_per_step, cfg.micro_batch_size,
                      cfg.seed, n_documents=cfg.n_documents or None)

    # model, tokenizer, optimizer
    source = resolve_source(os.path.join(cfg.out_dir, "ckpt") if cfg.init_from == "resume" else cfg.init_from)
    origin = run_origin(cfg, source)
    tokenizer = load_tokenizer(os.path.dirname(data_path(cfg.data)) if source == "scratch" else source)
    model = load_model(cfg, source, rank, device, fsdp, tokenizer)
    vocab_size = (model.model if isinstance(model, QuietStar) else model).args.vocab_size
    check_vocabulary(tokenizer, vocab_size, source)
    check_token_ids(documents, vocab_size, tokenizer)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, cfg.ffn_chunks)
    if cfg.compile:                       # per block, after checkpointing and before sharding
        for block in blocks_of(model):
            block.compile()
    if fsdp:
        model = shard_model(model, cfg, rank, device)
        wrapped = model
    else:
        model = model.to(device)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.startswith("cuda"))
    if cfg.init_from == "resume":
        checkpoint.load_optimizer_state(optimizer, os.path.join(source, f"optimizer.rank{rank}.pt"), device)
    autocast = autocast_context("cuda", cfg, fsdp) if device.startswith("cuda") else nullcontext()
    val_batches = None
    if cfg.eval_interval and cfg.val_data:
        val_batches = Batches(check_not_empty(Documents(data_path(cfg.val_data))), cfg.seq_len, cfg.micro_batch_size,
                              cfg.micro_batch_size, cfg.seed)
    metrics_path = checkpoint.prepare_out_dir(cfg.out_dir, cfg.init_from == "resume", cfg.overwrite,
                                              start_step, master, run_id)
    replacing = metrics_path.endswith(run_id)     # an earlier run stays whole until our first save
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if created_out_dir:                       # a run that fails before its first step leaves nothing
            atexit.register(checkpoint.remove_if_empty, cfg.out_dir)
        if replacing:                             # a run that fails before its first save leaves no trace
            atexit.register(checkpoint.remove_file, metrics_path)
    if world_size > 1:
        dist.barrier()
    n_params = sum(p.numel() for p in model.parameters()) * (world_size if fsdp else 1)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    args = (model.model if isinstance(model, QuietStar) else model).args
    flops_per_step = step_flops(args, quietstar_config(cfg), cfg.docs_per_step, cfg.seq_len, cfg.mode)
    wandb = None
    if master and cfg.wandb_project:
        import wandb
        wandb.init(project=cfg.wandb_project, config=asdict(cfg))
    if master:
        print(f"training {type(model).__name__} ({n_params / 1e6:.1f}M parameters), mode {cfg.mode}, "
              f"{world_size} process(es){' with FSDP2' if fsdp else ' with DDP' if world_size > 1 else ''}, "
              f"{device}, steps {start_step + 1}..{cfg.max_steps}, out_dir {cfg.out_dir}")

    stop = {"signal": None, "step": start_step + 1}
    install_signal_handlers(stop, master, cfg.out_dir)
    model.train()
    metrics_file = open(metrics_path, "a") if master else None
    t_start = time.time()
    step = start_step
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        done = step + 1                  # steps done after this one; the console's and metrics' number
        stop["step"] = done
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        per_micro, processed = [], 0
        for m in range(n_micro):
            last = m == n_micro - 1
            if world_size > 1 and not fsdp:
                wrapped.require_backward_grad_sync = last        # set before the forward
            elif fsdp:
                model.set_requires_gradient_sync(last)
            tokens, valid, doc_ids = batches.micro_batch(step, rank * n_micro + m)
            tokens, valid = tokens.to(device), valid.to(device)
            try:
                loss, metrics, n = micro_step(model, wrapped, tokens, valid, doc_ids, cfg, step, autocast)
            except RuntimeError as e:   # sampling from non-finite logits
                if "inf" not in str(e) and "nan" not in str(e):
                    raise
                stop_non_finite(done, "logits", cfg, master)
            (loss / n_micro).backward()
            per_micro.append(metrics)
            processed += n
        metrics = average_metrics(per_micro, world_size)
        if not math.isfinite(metrics["loss"]):
            stop_non_finite(done, f"loss ({metrics['loss']})", cfg, master)
        grad_norm = clip_gradients(model, cfg.grad_clip, fsdp).item()
        if not math.isfinite(grad_norm):
            stop_non_finite(done, f"gradient norm ({grad_norm})", cfg, master)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        last_of_run = done == cfg.max_steps or stop["signal"] is not None

        if master and (step % cfg.log_interval == 0 or done == cfg.max_steps):
            tokens_per_s = processed * world_size / dt
            mfu = flops_per_step / dt / (peak_flops * world_size) if peak_flops else None
            peak_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            eta = (time.time() - t_start) / (done - start_step) * (cfg.max_steps - done)
            record = dict(step=done, lr=learning_rate(cfg, step), grad_norm=float(grad_norm),
                          tokens_per_s=tokens_per_s, mfu=mfu, peak_mem_gb=peak_mem / 2**30,
                          step_time_s=dt, **metrics)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            parts = "".join(f" {k} {metrics[k]:.4g}" for k in
                            ("nll_base", "nll_talk", "policy_loss", "reward_mean", "mix_weight_mean") if k in metrics)
            print(f"step {done}/{cfg.max_steps} ({done / cfg.max_steps:4.0%}, eta {eta / 60:4.1f}m) "
                  f"loss {metrics['loss']:.4f}{parts} lr {record['lr']:.2e} grad {float(grad_norm):.3f} "
                  f"{tokens_per_s:,.0f} tok/s{f' mfu {mfu:.1%}' if mfu else ''} "
                  f"mem {peak_mem / 2**30:.1f}GB {dt:.2f}s", flush=True)
            if wandb:
                wandb.log(record, step=done)
        if master and cfg.mode == "quietstar" and cfg.thought_interval and done % cfg.thought_interval == 0 \
                and not fsdp and not last_of_run:                   # the last one is shown below
            show_thought(model, tokenizer, tokens, valid, cfg, step)
            if cfg.final_eval == "arith":
                from data.arith.report import thought_report, training_examples
                thought_report(model, tokenizer, training_examples(), cfg.seed, done)
        if val_batches and done % cfg.eval_interval == 0:
            val = validation_loss(model, wrapped, cfg, step, val_batches)
            if master:
                print(f"  validation loss {val:.4f}")
                metrics_file.write(json.dumps({"step": done, "val_loss": val}) + "\n")
        if cfg.eval_interval and cfg.eval_paper_examples and done % cfg.eval_interval == 0 \
                and master and isinstance(model, QuietStar) and not fsdp:
            scores = paper_metric_during_training(model, tokenizer, cfg)
            print("  " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            metrics_file.write(json.dumps({"step": done, **scores}) + "\n")
        if done % cfg.save_interval == 0 or last_of_run:
            if not checkpoint.weights_are_finite(model, world_size):
                stop_non_finite(done, "weights after the update", cfg, master)
            settings = {**asdict(cfg), "init_from": origin}           # resumes keep the run's origin
            checkpoint.save_checkpoint(model, optimizer, settings, done, rank, world_size, fsdp,
                                       tokenizer.path, run_id)
            if master and replacing:              # the earlier run's checkpoint is gone: its metrics go too
                checkpoint.finish_replacing(cfg.out_dir, run_id)
                replacing = False
            if master:
                print(f"  saved {cfg.out_dir}/ckpt (step {done})", flush=True)
        if stop["signal"]:
            if master:
                print(f"stopped by signal {stop['signal']} after step {done} of {cfg.max_steps}, so no "
                      f"final evaluation; resume with --init_from=resume --out_dir={cfg.out_dir}")
            break

    if master and cfg.mode == "quietstar" and start_step < cfg.max_steps and not fsdp and not stop["signal"]:
        print("a thought from the trained model:")
        show_thought(model, tokenizer, tokens, valid, cfg, step)
    if master and cfg.final_eval == "arith" and isinstance(model, QuietStar) and not fsdp and not stop["signal"]:
        from data.arith.report import final_report, load_test, thinking_summary
        problems = load_test(limit=cfg.final_eval_problems)
        if origin == "resume":       # a checkpoint from before runs kept their origin: no base model
            print("no base-model controls: this checkpoint does not say what the run started from")
            evaluated = thinking_summary(model, tokenizer, problems, cfg.seed)
        else:
            base = load_model(cfg, resolve_source(origin), rank, device, fsdp, tokenizer).to(device)  # as at step 0
            rows = final_report(model, base, tokenizer, problems, cfg.seed)
            evaluated = {f"arith/exact/{key}": rows[f"trained, {name}"]["exact"]       # for plot_run.py
                         for key, name in (("thinking", "with thinking"), ("no_thinking", "without thinking"))}
        metrics_file.write(json.dumps({"step": cfg.max_steps, **evaluated}) + "\n")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, sys.argv[1:])
