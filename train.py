"""
Quiet-STaR training, in one readable loop, from one CPU to many GPUs.

    python train.py                          # = config/arith.py: a tiny model learns to think (CPU, minutes)
    python train.py --init_from=scratch      # any argument: TrainConfig's defaults (tiny model, math corpus)
    python train.py --max_steps=20 --device=cpu
    python train.py config/quietstar_mistral7b.py --init_from=/path/to/Mistral-7B-v0.1
    torchrun --standalone --nproc_per_node=8 train.py config/quietstar_mistral7b.py \
        --init_from=/path/to/Mistral-7B-v0.1                        # 8 GPUs, FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=10.0.0.1 \
        --master_port=29500 train.py config/quietstar_mistral7b.py ...  # and node_rank=1 on the other
    python train.py --init_from=resume --out_dir=out                # continue where it stopped

Settings are the fields of TrainConfig below. Override them with config files (Python files
of plain assignments, see config/) and then with --name=value arguments; both are
type-checked, and the final settings are saved with every checkpoint.

One optimizer step: the step's documents (docs_per_step, the same whatever the number of
processes) are split into micro-batches; for each, thoughts are sampled without gradient,
then the Quiet-STaR loss is computed and backpropagated; gradients are averaged over
micro-batches and processes, clipped, and AdamW steps. mode=lm does plain next-token
fine-tuning on the same data instead (the paper's baseline).
"""

import ast
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dataloader import Batches, Documents
from model import PEAK_BF16_FLOPS, ModelArgs, Transformer, read_config
from quietstar import QuietStar, QuietStarConfig, quietstar_loss
from tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = "config/arith.py"   # what `python train.py` runs: thinking that helps, on a CPU


@dataclass
class TrainConfig:
    # what to train, from where, to where
    init_from: str = "scratch"       # "scratch" (a preset), a checkpoint directory, or "resume"
    preset: str = "tiny"             # model preset for init_from=scratch
    mode: str = "quietstar"          # "quietstar", or "lm" for plain next-token fine-tuning
    out_dir: str = "out"
    # data (see dataloader.py); data/math is prepared automatically on first use
    data: str = "data/math/train"    # path prefix of NAME.bin + NAME.idx.npy
    val_data: str = "data/math/val"
    n_documents: int = 0             # use only the first N documents (0: all); the paper: 1000
    seq_len: int = 64                # the paper: 256
    docs_per_step: int = 4           # documents per optimizer step; the paper: 8
    micro_batch_size: int = 2        # documents per forward/backward on one process
    seed: int = 42
    # Quiet-STaR (see quietstar.py); the paper: 9 thought tokens, 4 talk steps, 2 thoughts
    n_thought_tokens: int = 4
    n_talk: int = 2
    n_thoughts: int = 2
    policy_weight: float = 1e6
    reinforce_temperature: float = 3.0
    base_loss_weight: float = 0.5
    positive_advantage_only: bool = True
    embedding_scale: float = 100.0
    delimiter_init_id: int = 11940   # token whose embedding starts <start> and <end> ('▁---')
    # optimisation: AdamW on every parameter (weight decay too, as the official run)
    learning_rate: float = 1e-3      # the paper: 1e-6 (on a pretrained model)
    weight_decay: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 10           # linear warm-up, then constant (the paper: 20)
    max_steps: int = 60              # the paper: 100
    grad_clip: float = 1.0
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype
    pure_bf16: bool = False          # bf16 weights and optimizer state, as the official run
    fsdp: bool = True                # with several processes: FSDP2 if True, else DDP
    activation_checkpointing: bool = False
    # logging and checkpoints
    log_interval: int = 1
    thought_interval: int = 20       # show one sampled thought every N steps (0: never)
    eval_interval: int = 0           # validation loss every N steps (0: never)
    eval_batches: int = 4
    eval_paper_examples: int = 0     # with eval_interval: the paper's GSM8K/CSQA metric on N examples
    save_interval: int = 50
    final_eval: str = ""             # "arith": held-out accuracy with vs without thinking at the end
    wandb_project: str = ""          # log to Weights & Biases when set (and wandb is installed)


# -----------------------------------------------------------------------------
# settings: defaults <- config files <- --name=value

def parse_config(argv):
    """TrainConfig from config files and --name=value arguments, type-checked."""
    return make_config(read_overrides(argv))


def read_overrides(argv):
    """{name: value} from config files and --name=value arguments, in order."""
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"{arg}: config file not found")
            scope = {}
            exec(open(arg).read(), {}, scope)
            values.update({k: v for k, v in scope.items() if not k.startswith("_")})
        else:
            if "=" not in arg:
                raise SystemExit(f"{arg}: expected --name=value")
            name, text = arg[2:].split("=", 1)
            try:
                values[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                values[name] = text                 # a plain string
    return values


def make_config(values):
    types = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in values.items():
        if name not in types:
            raise SystemExit(f"unknown setting {name!r}; settings are: {', '.join(types)}")
        expected = types[name]
        if expected is float and type(value) is int:
            values[name] = value = float(value)
        if expected is str and type(value) is not str:
            values[name] = value = str(value)
        if type(value) is not expected:
            raise SystemExit(f"setting {name}={value!r}: expected {expected.__name__}, "
                             f"got {type(value).__name__}")
    return TrainConfig(**values)


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
    """FSDP2: shard every transformer block, then the rest; rank 0's weights are broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    full_state = model.state_dict() if rank == 0 else {}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.dtype == "bfloat16" and not cfg.pure_bf16 else MixedPrecisionPolicy()
    for block in blocks_of(model):
        fully_shard(block, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if isinstance(model, QuietStar):
        register_fsdp_forward_method(model, "sample_thoughts")
    return model


def enable_activation_checkpointing(model):
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    layers = blocks_of(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


@torch.no_grad()
def clip_gradients(model, max_norm, fsdp):
    """Scale all gradients so that their global norm is at most max_norm; returns the norm.
    The sum of squares is accumulated in float64: in float32 the many tiny gradients of the
    32002-wide output layer get lost (measured: 3e-4 of the squared norm), and the result then
    depends on how the parameters are sharded."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    total = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in local)
    if fsdp:                                   # every process holds a shard of every gradient
        dist.all_reduce(total)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm.item()


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


def micro_step(model, wrapped, tokens, valid, doc_ids, cfg, step):
    """-> (loss, metrics, tokens processed) for one micro-batch."""
    B, L = tokens.shape
    if cfg.mode == "lm":
        logits = wrapped(tokens)
        ok = valid[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][ok], tokens[:, 1:][ok])
        return loss, {"loss": loss.item(), "nll_base": loss.item()}, B * L
    thoughts = sample_thoughts(model, tokens, valid, doc_ids, cfg, step)
    out = wrapped(tokens, thoughts, valid)
    loss, metrics = quietstar_loss(out, tokens, thoughts, valid, model.config)
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
# checkpoints: model (Quiet-STaR layout) + state.json + optimizer state per process

def full_state_dict(model, fsdp):
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(optimizer):
    """Optimizer state with plain tensors (FSDP keeps each process's shard as a DTensor)."""
    state = optimizer.state_dict()
    for per_param in state["state"].values():
        for k, v in per_param.items():
            if hasattr(v, "to_local"):
                per_param[k] = v.to_local()
    return state


def load_optimizer_state(optimizer, state):
    from torch.distributed.tensor import DTensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, per_param in state["state"].items():
        p = params[int(i)]
        for k, v in per_param.items():
            if isinstance(p, DTensor) and v.dim() > 0:
                per_param[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)


def save_checkpoint(model, optimizer, cfg, step, rank, world_size, fsdp, tokenizer=None):
    """out_dir/ckpt, replaced as a whole: written to a temporary directory, then renamed."""
    final, tmp = os.path.join(cfg.out_dir, "ckpt"), os.path.join(cfg.out_dir, "ckpt.tmp")
    state_dict = full_state_dict(model, fsdp)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if isinstance(model, QuietStar):
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            model.save_pretrained(tmp)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"config": asdict(cfg), "step": step, "world_size": world_size}, f, indent=2)
        if hasattr(tokenizer, "save"):                  # a compact vocabulary travels with the weights
            tokenizer.save(tmp)
    if world_size > 1:
        dist.barrier()
    torch.save(optimizer_state(optimizer), os.path.join(tmp, f"optimizer.rank{rank}.pt"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        old = final + ".old"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if world_size > 1:
        dist.barrier()


def resume_settings(argv):
    """For init_from=resume: the saved settings, with this command line's overrides on top."""
    overrides = read_overrides(argv)
    state_file = os.path.join(make_config(dict(overrides)).out_dir, "ckpt", "state.json")
    if not os.path.isfile(state_file):
        raise SystemExit(f"{state_file}: no checkpoint to resume from")
    state = json.load(open(state_file))
    saved = {**state["config"], **overrides, "init_from": "resume"}
    return make_config(saved), state["step"]


# -----------------------------------------------------------------------------

def stop_non_finite(step, what, cfg, master):
    """Stop before the optimizer step, so the last checkpoint stays the last good one."""
    if master:
        print(f"step {step}: {what} is not finite; stopping without saving "
              f"(the last good checkpoint in {cfg.out_dir}/ckpt is untouched)", flush=True)
    sys.exit(1)


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
    argv = argv or [os.path.join(HERE, DEFAULT_CONFIG)]   # no arguments: the classroom run
    cfg = parse_config(argv)
    start_step = 0
    if cfg.init_from == "resume":
        cfg, start_step = resume_settings(argv)
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    fsdp = cfg.fsdp and world_size > 1
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)

    # data
    if master:
        from data.math.prepare import ensure_prepared
        from data.arith.prepare import ensure_prepared as ensure_arith_prepared
        ensure_prepared(cfg.data, cfg.val_data if cfg.eval_interval else "")
        ensure_arith_prepared(cfg.data, cfg.val_data if cfg.eval_interval else "")
    if world_size > 1:
        dist.barrier()
    data_path = cfg.data if os.path.isabs(cfg.data) else os.path.join(HERE, cfg.data)
    n_micro_total = cfg.docs_per_step // cfg.micro_batch_size
    if cfg.docs_per_step % (cfg.micro_batch_size * world_size):
        raise SystemExit(f"docs_per_step={cfg.docs_per_step} must be a multiple of "
                         f"micro_batch_size x processes = {cfg.micro_batch_size * world_size}")
    n_micro = n_micro_total // world_size                  # micro-batches per process and step
    batches = Batches(Documents(data_path), cfg.seq_len, cfg.docs_per_step, cfg.micro_batch_size,
                      cfg.seed, n_documents=cfg.n_documents or None)

    # model and optimizer
    source = os.path.join(cfg.out_dir, "ckpt") if cfg.init_from == "resume" else cfg.init_from
    source = source if source == "scratch" or os.path.isabs(source) or os.path.isdir(source) else \
        os.path.join(HERE, source)
    tokenizer = load_tokenizer(os.path.dirname(data_path) if source == "scratch" else source)
    model = load_model(cfg, source, rank, device, fsdp, tokenizer)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if fsdp:
        model = shard_model(model, cfg, rank, device)
        wrapped = model
    else:
        model = model.to(device)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.startswith("cuda"))
    if cfg.init_from == "resume":
        file = os.path.join(source, f"optimizer.rank{rank}.pt")
        load_optimizer_state(optimizer, torch.load(file, map_location=device, weights_only=True))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) \
        if device.startswith("cuda") and cfg.dtype == "bfloat16" and not cfg.pure_bf16 and not fsdp \
        else nullcontext()
    val_batches = None
    if cfg.eval_interval and cfg.val_data:
        val_path = cfg.val_data if os.path.isabs(cfg.val_data) else os.path.join(HERE, cfg.val_data)
        val_batches = Batches(Documents(val_path), cfg.seq_len, cfg.micro_batch_size,
                              cfg.micro_batch_size, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters()) * (world_size if fsdp else 1)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    wandb = None
    if master and cfg.wandb_project:
        import wandb
        wandb.init(project=cfg.wandb_project, config=asdict(cfg))
    if master:
        print(f"training {type(model).__name__} ({n_params / 1e6:.1f}M parameters), mode {cfg.mode}, "
              f"{world_size} process(es){' with FSDP2' if fsdp else ' with DDP' if world_size > 1 else ''}, "
              f"{device}, steps {start_step}..{cfg.max_steps}, out_dir {cfg.out_dir}")

    stop = {"signal": None}   # SIGINT/SIGTERM: finish the step, save, exit

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    model.train()
    metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master else None
    t_start = time.time()
    step = start_step
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
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
                with autocast:
                    loss, metrics, n = micro_step(model, wrapped, tokens, valid, doc_ids, cfg, step)
            except RuntimeError as e:   # sampling from non-finite logits
                if "inf" not in str(e) and "nan" not in str(e):
                    raise
                stop_non_finite(step, "the logits", cfg, master)
            (loss / n_micro).backward()
            per_micro.append(metrics)
            processed += n
        metrics = average_metrics(per_micro, world_size)
        if not math.isfinite(metrics["loss"]):
            stop_non_finite(step, f"the loss ({metrics['loss']})", cfg, master)
        grad_norm = clip_gradients(model, cfg.grad_clip, fsdp)
        if not math.isfinite(grad_norm):
            stop_non_finite(step, f"the gradient norm ({grad_norm})", cfg, master)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        done = step + 1

        if master and (step % cfg.log_interval == 0 or done == cfg.max_steps):
            tokens_per_s = processed * world_size / dt
            mfu = 6 * n_params * tokens_per_s / (peak_flops * world_size) if peak_flops else None
            peak_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            eta = (time.time() - t_start) / (done - start_step) * (cfg.max_steps - done)
            record = dict(step=step, lr=learning_rate(cfg, step), grad_norm=float(grad_norm),
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
                wandb.log(record, step=step)
        if master and cfg.mode == "quietstar" and cfg.thought_interval and done % cfg.thought_interval == 0 \
                and not fsdp:
            show_thought(model, tokenizer, tokens, valid, cfg, step)
        if val_batches and done % cfg.eval_interval == 0:
            val = validation_loss(model, wrapped, cfg, step, val_batches)
            if master:
                print(f"  validation loss {val:.4f}")
                metrics_file.write(json.dumps({"step": step, "val_loss": val}) + "\n")
        if cfg.eval_interval and cfg.eval_paper_examples and done % cfg.eval_interval == 0 \
                and master and isinstance(model, QuietStar) and not fsdp:
            scores = paper_metric_during_training(model, tokenizer, cfg)
            print("  " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            metrics_file.write(json.dumps({"step": step, **scores}) + "\n")
        if done % cfg.save_interval == 0 or done == cfg.max_steps or stop["signal"]:
            save_checkpoint(model, optimizer, cfg, done, rank, world_size, fsdp, tokenizer)
            if master:
                print(f"  saved {cfg.out_dir}/ckpt (step {done})")
        if stop["signal"]:
            if master:
                print(f"stopped by signal {stop['signal']} after step {done}; resume with "
                      f"--init_from=resume --out_dir={cfg.out_dir}")
            break

    if master and cfg.mode == "quietstar" and start_step < cfg.max_steps and not fsdp:
        print("a thought from the trained model:")
        show_thought(model, tokenizer, tokens, valid, cfg, step)
    if master and cfg.final_eval == "arith" and isinstance(model, QuietStar) and not fsdp:
        from data.arith.report import load_test, thinking_summary
        thinking_summary(model, tokenizer, load_test(), cfg.seed)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
