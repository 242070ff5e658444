"""
Will it fit? Peak GPU memory, FLOPs and step time of one training step, before renting GPUs.

usage: python estimate.py [CONFIG.py ...] [--name=value ...] [--gpus N] [--gpu_memory GiB]
                          [--peak_tflops T] [--mfu F] [--quick] [--n_layers K] [--table] [--real]

    python estimate.py config/quietstar_mistral7b.py --gpus 8 --gpu_memory 80
    python estimate.py config/quietstar_mistral7b.py --gpus 1 --gpu_memory 141 --pure_bf16=True
    python estimate.py config/quietstar_mistral7b.py --gpus 2 --activation_checkpointing=False

It takes train.py's config files and --name=value settings (Mistral-7B shapes unless --preset
or --init_from=DIR say otherwise; compute in bfloat16 unless --dtype says otherwise), plus:
    --gpus N            processes (one GPU each); FSDP2 when N > 1 (with --fsdp=False, DDP:
                        one process's tensors plus its gradient buckets)
    --gpu_memory GiB    memory of one GPU, for the fits / does not fit verdict (default 80)
    --peak_tflops T     dense bf16 peak of one GPU (default 989, an H100 SXM)
    --mfu F             model FLOPs utilisation assumed for the step time (default 0.4)
    --quick             run 2 and 4 blocks and extend linearly to all (~5x faster at 7B)
    --n_layers K        build only K transformer blocks (a quick check of the method)
    --table             docs/gpu.md's table for this config: 1/2/4/8 GPUs, fp32 or bf16
                        weights, checkpointing off/on (all with --quick; ~10 minutes at 7B)
    --real              also run the step on real CPU tensors (random weights; one process)
                        and print how much memory it took beside the estimate, e.g.
                        --n_layers=2 --seq_len=32 --docs_per_step=1 --pure_bf16=True
                        (Mistral's width: ~7 GB of RAM, ~3 minutes)

How: it runs ONE real training step of that config, with train.py's own pieces (the model,
activation checkpointing and FSDP2 sharding of train.py, sample_thoughts, the forward,
quietstar_loss, backward, gradient clipping, AdamW, gradient accumulation over micro-batches),
on fake tensors (FakeTensorMode: shapes and dtypes, no data) and, for N > 1, a fake process
group of N ranks. torch.distributed._tools' MemTracker / FSDPMemTracker follow every tensor
the step allocates and frees and report the peak of one GPU (rank 0) by kind;
FlopCounterMode counts the FLOPs of every matmul and attention (without its module tracker,
see flop_counter).

What it does not model (add a margin for them): allocator caching and fragmentation, the CUDA
context (~0.5-1 GiB), NCCL buffers, cuBLAS/flash-attention workspaces, and the differences
between CUDA and this CPU run: SDPA backend choice and autocast op lists (the step runs on fake
*CPU* tensors with CPU autocast, because fake CUDA tensors cannot run backward on a CPU-only
build). Data-dependent values stand in: every token is real text (full-length documents), and
losses, gradient norm and Adam's step count read as 1. Quiet-STaR's thought attention runs the
memory-lean "chunked" path, standing in for flex attention on CUDA (which, like it, keeps only
its output and log-sum-exp for backward).
"""

import os
import sys
import time
import warnings
from dataclasses import replace
from unittest.mock import patch

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

import train
from cli import make_settings, read_overrides
from model import ModelArgs, Transformer, read_config
from quietstar import QuietStar, step_flops

OPTIONS = {"gpus": int, "gpu_memory": float, "peak_tflops": float, "mfu": float, "n_layers": int}
DEFAULTS = {"gpus": 1, "gpu_memory": 80.0, "peak_tflops": 989.0, "mfu": 0.4, "n_layers": 0, "quick": False,
            "real": False}
GiB = 2 ** 30
MARGIN = 3.0   # GiB a GPU needs beyond the tensors: CUDA context, NCCL, allocator slack


# -----------------------------------------------------------------------------
# settings

def parse_args(argv):
    """-> (TrainConfig, estimate options), from train.py's settings and ours."""
    options, rest, i = dict(DEFAULTS), [], 0
    while i < len(argv):
        name = argv[i][2:].split("=", 1)[0] if argv[i].startswith("--") else None
        if argv[i] in ("--quick", "--quick=True", "--real", "--real=True"):
            options[name] = True
        elif name in OPTIONS:
            if "=" in argv[i]:
                text = argv[i].split("=", 1)[1]
            elif i + 1 < len(argv):
                text, i = argv[i + 1], i + 1
            else:
                raise SystemExit(f"--{name}: expected a value")
            try:
                options[name] = OPTIONS[name](text)
            except ValueError:
                raise SystemExit(f"--{name}={text}: expected {OPTIONS[name].__name__}")
        else:
            rest.append(argv[i])
        i += 1
    if options["gpus"] < 1 or options["gpu_memory"] <= 0 or options["peak_tflops"] <= 0 \
            or not 0 < options["mfu"] <= 1:
        raise SystemExit("--gpus must be >= 1, --gpu_memory and --peak_tflops > 0, --mfu in (0, 1]")
    # a GPU run computes in bfloat16 by default; estimate.py is about the paper's model
    values = {"dtype": "bfloat16", "preset": "mistral-7b", **read_overrides(rest)}
    return train.check_settings(make_settings(train.TrainConfig, values)), options


def model_args_of(cfg, n_layers=0):
    """The shapes of the model cfg trains: a checkpoint directory's config, or the preset."""
    source = cfg.init_from
    if source not in ("scratch", "resume") and os.path.isdir(source):
        args = read_config(source)[0]
        if cfg.mode == "quietstar" and args.vocab_size == 32000:
            args.vocab_size += 2                                   # the two delimiters
    else:
        if source != "scratch":
            print(f"note: init_from={source} is not a checkpoint directory here; "
                  f"using preset {cfg.preset}'s shapes")
        args = ModelArgs.from_name(cfg.preset, vocab_size=32002 if cfg.mode == "quietstar" else 32000)
    if n_layers:
        args.n_layers = n_layers
    return args


# -----------------------------------------------------------------------------
# one step on fake tensors

class StandIns(TorchDispatchMode):
    """What fake tensors cannot know: a boolean mask counts as all True (every token is real
    text), and reading a number out of a tensor (.item()) gives 1."""

    INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t.__name__ == "DTensor" for t in types):
            return NotImplemented                       # let DTensor turn into local tensors first
        if func in self.INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = []
            for i in args[1]:
                if i is not None and i.dtype == torch.bool:    # a mask of k dims -> k index lists
                    indices += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
                else:
                    indices.append(i)
            return func(args[0], indices, *args[2:], **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].is_floating_point() else 1
        return func(*args, **kwargs)


def peak_only(tracker_class):
    """The tracker, updating only the overall peak after each op: its per-module peaks cost a
    walk over every module per op (a third of the run at 7B) and are not used here."""

    def _update_peak_stats(self, peak_state):
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)
    return type(tracker_class.__name__, (tracker_class,), {"_update_peak_stats": _update_peak_stats})


def flop_counter():
    """FlopCounterMode without its module tracker. The tracker hooks the inputs and outputs of
    every module call for gradients, and under activation checkpointing the blocks are called
    again in the backward: those hooks then keep each recomputed block's graph, with its saved
    activations, alive until the counter exits (the end of the step). Counted with it, a
    checkpointed step held every recomputed block at once (1 GPU, 7B, pure bf16: 93.5 GiB
    instead of 58.4). Only the total is needed here, so every op counts towards "Global"."""
    from torch.utils.flop_counter import FlopCounterMode

    class Untracked:                     # FlopCounterMode reads .parents and enters/exits it
        parents = {"Global"}
        __enter__ = __exit__ = lambda self, *args: None
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = Untracked()
    return counter


class MicroStep(nn.Module):
    """One micro-batch (sampling, forward, loss) as one module call: the memory trackers accept
    a module called once per iteration, and the blocks run many times inside it."""

    def __init__(self, model, cfg, fsdp):
        super().__init__()
        self.model, self.cfg, self.fsdp = model, cfg, fsdp

    def forward(self, tokens, valid, doc_ids):
        autocast = train.autocast_context("cpu", self.cfg, self.fsdp)     # CPU's stands in for CUDA's
        return train.micro_step(self.model, self.model, tokens, valid, doc_ids, self.cfg, 0, autocast)


def meta_model(cfg, args):
    """The model as train.py makes it, on the meta device (shapes only)."""
    dtype = torch.bfloat16 if cfg.pure_bf16 else torch.float32
    with torch.device("meta"):
        model = Transformer(args)
        if cfg.mode == "quietstar":
            model = QuietStar(model, train.quietstar_config(cfg))
    model = model.to(dtype)
    if isinstance(model, QuietStar):
        model.attention_impl = "chunked"   # flex's stand-in: keeps little for backward, as flex
    if cfg.activation_checkpointing:
        train.enable_activation_checkpointing(model, cfg.ffn_chunks)
    return model


def materialise(model, cfg, fsdp, mesh):
    """Fake weights (call inside FakeTensorMode), sharded as train.py shards them; and AdamW."""
    if fsdp:
        # train.py's sharding, with two things fake tensors cannot do taken out: fully_shard's
        # default device mesh is built from a tensor of rank numbers (here: the mesh made
        # outside FakeTensorMode), and loading rank 0's weights reads values (none needed here)
        import torch.distributed.checkpoint.state_dict as state_dict
        from torch.distributed.fsdp._fully_shard import _fully_shard
        with patch.object(_fully_shard, "_init_default_mesh", lambda *args, **kwargs: mesh), \
                patch.object(state_dict, "set_model_state_dict", lambda *args, **kwargs: None):
            model = train.shard_model(model, cfg, dist.get_rank(), "cpu")
    else:
        model.to_empty(device="cpu")
    # fused=False: the fused kernel's state on FSDP DTensors is over-counted on fake tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
    # AdamW makes its state at the first step; a real run holds it from then on, so make it now
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def real_step(cfg, args):
    """
    The step fake_step runs, on real CPU tensors (random weights; one process). -> bytes by
    which the resident set's high-water mark rose over the step, i.e. its peak above the
    weights and AdamW state held before it (what fake_step's total - held estimates), and the
    same peak of the live tensors (counted by the tracker fake_step uses, on real ones). Needs
    Linux's /proc, and glibc's malloc returning freed blocks at once (main sets its mmap
    threshold), so that the resident set follows the live tensors.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    torch.manual_seed(cfg.seed)
    model = meta_model(cfg, args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if isinstance(model, QuietStar):
        model.init_thought_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=False, foreach=False)
    for p in model.parameters():                      # AdamW's state, as a running job holds it
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_micro = cfg.docs_per_step // cfg.micro_batch_size
    B, L = cfg.micro_batch_size, cfg.seq_len
    tracker = peak_only(MemTracker)()       # the live tensors too, as fake_step counts them
    tracker.track_external(model, optimizer)
    step = MicroStep(model, cfg, False)
    open("/proc/self/clear_refs", "w").write("5")    # resets VmHWM to the resident set now
    before = status("VmRSS")
    with tracker:
        held = tracker.get_tracker_snapshot()
        for m in range(n_micro):
            tokens = torch.randint(3, 32000, (B, L))
            loss, _, _ = step(tokens, torch.ones(B, L, dtype=torch.bool), list(range(m * B, (m + 1) * B)))
            (loss / n_micro).backward()
            tracker.reset_mod_stats()
        train.clip_gradients(model, cfg.grad_clip, False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = lambda snapshot: sum(s["Total"] for s in snapshot.values())
    return status("VmHWM") - before, total(tracker.get_tracker_snapshot("peak")) - total(held)


def fake_step(cfg, args, gpus):
    """
    Run one optimizer step on fake tensors, as rank 0 of `gpus` processes.
    -> dict: peak bytes by kind (parameters, gradients, optimizer, activations), FLOPs counted
    on this process, micro-batches per process, tokens processed per process.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    fsdp = cfg.fsdp and gpus > 1
    if cfg.docs_per_step % (cfg.micro_batch_size * gpus):
        raise SystemExit(f"docs_per_step={cfg.docs_per_step} must be a multiple of "
                         f"micro_batch_size x gpus = {cfg.micro_batch_size * gpus}")
    n_micro = cfg.docs_per_step // (cfg.micro_batch_size * gpus)
    if fsdp:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    mesh = init_device_mesh("cpu", (gpus,)) if fsdp else None
    try:
        model = meta_model(cfg, args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model, optimizer = materialise(model, cfg, fsdp, mesh)
            if fsdp:
                tracker = peak_only(FSDPMemTracker)(model, optimizer)
            else:
                tracker = peak_only(MemTracker)()
                tracker.track_external(model, optimizer)
            step = MicroStep(model, cfg, fsdp)
            flops = flop_counter()
            # micro-batches after the second are alike (gradients already held, no sync), so
            # run the first, the second and (FSDP: it reduce-scatters) the last; FLOPs and
            # tokens are scaled to all of them
            run = [m for m in range(n_micro) if m in (0, 1) or (fsdp and m == n_micro - 1)]
            processed = 0
            with tracker, flops, StandIns():
                held = tracker.get_tracker_snapshot()  # at the step's start: weights, AdamW state
                for m in run:                              # as train.py's step
                    if fsdp:
                        model.set_requires_gradient_sync(m == n_micro - 1)
                    B, L = cfg.micro_batch_size, cfg.seq_len
                    tokens = torch.randint(0, 32000, (B, L))
                    valid = torch.ones(B, L, dtype=torch.bool)
                    loss, _, n = step(tokens, valid, list(range(B)))
                    (loss / n_micro).backward()
                    processed += n
                    tracker.reset_mod_stats()              # the next micro-batch calls it again
                train.clip_gradients(model, cfg.grad_clip, fsdp)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                left = tracker.get_tracker_snapshot()      # at the step's end: as at its start
            peak = max(tracker.get_tracker_snapshot("peak").values(), key=lambda s: s["Total"])
    finally:
        if fsdp:
            dist.destroy_process_group()
    kinds = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in peak.items()}
    params = sum(kinds.get(k, 0) for k in ("Parameter", "Sharded Param", "Unsharded Param",
                                            "All Gather", "Buffer"))
    grads = sum(kinds.get(k, 0) for k in ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter"))
    opt = sum(kinds.get(k, 0) for k in ("Optstate", "OptState"))
    total = kinds["Total"]
    if gpus > 1 and not fsdp:     # DDP copies every gradient into its communication buckets
        buckets = sum(p.numel() * p.element_size() for p in model.parameters())
        grads, total = grads + buckets, total + buckets
    held = sum(s["Total"] for s in held.values())
    left = sum(s["Total"] for s in left.values())
    return dict(total=total, held=held, left=left, parameters=params, gradients=grads, optimizer=opt,
                activations=total - params - grads - opt,
                n_micro=n_micro, processed=processed * n_micro // len(run),
                flops=flops.get_total_flops() * n_micro / len(run))


# -----------------------------------------------------------------------------

def estimate(cfg, gpus=1, n_layers=0, quick=False):
    """-> dict of figures for one optimizer step of cfg on `gpus` GPUs (see fake_step), plus
    the analytic model FLOPs of the step (all GPUs) and the text tokens it trains on.
    quick: run 2 and 4 blocks and extend every figure linearly to all of them (each block
    adds the same weights, state and saved activations; see docs/gpu.md for how close)."""
    args = model_args_of(cfg, n_layers)
    if quick and args.n_layers > 4:
        two, four = (fake_step(cfg, replace(args, n_layers=k), gpus) for k in (2, 4))
        result = {k: v if k in ("n_micro", "processed") else v + (v - two[k]) * (args.n_layers - 4) / 2
                  for k, v in four.items()}
    else:
        result = fake_step(cfg, args, gpus)
    qs_config = train.quietstar_config(cfg)
    result["model_flops"] = step_flops(args, qs_config, cfg.docs_per_step, cfg.seq_len, cfg.mode)
    result["text_tokens"] = cfg.docs_per_step * cfg.seq_len
    return result


def table(argv):
    """docs/gpu.md's table: the given config on 1, 2, 4, 8 GPUs, fp32 master weights or pure
    bf16, activation checkpointing off or on (each estimated with --quick), as Markdown."""
    cfg, opt = parse_args(argv)
    print("| GPUs | weights | checkpointing | micro-batches per GPU | parameters | gradients | "
          "AdamW | activations | **peak per GPU** | fits 80 GB | fits 141 GB | step at MFU "
          f"{opt['mfu']:g} |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|", flush=True)
    for gpus in (1, 2, 4, 8):
        for pure in (False, True):
            for checkpointing in (False, True):
                c = replace(cfg, pure_bf16=pure, activation_checkpointing=checkpointing)
                r = estimate(c, gpus, opt["n_layers"], quick=True)
                gib = [f"{r[k] / GiB:.1f}" for k in ("parameters", "gradients", "optimizer", "activations")]
                peak = r["total"] / GiB
                seconds = r["model_flops"] / (gpus * opt["peak_tflops"] * 1e12 * opt["mfu"])
                print(f"| {gpus} | {'bf16' if pure else 'fp32'} | {'on' if checkpointing else 'off'} | "
                      f"{r['n_micro']} | {' | '.join(gib)} | **{peak:.1f}** | "
                      f"{'yes' if peak + MARGIN <= 80 else 'no'} | {'yes' if peak + MARGIN <= 141 else 'no'} | "
                      f"{seconds:.1f} s |", flush=True)


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")   # about in-place ops on outputs
    if "--table" in argv:
        return table([a for a in argv if a != "--table"])
    cfg, opt = parse_args(argv)
    gpus = opt["gpus"]
    if opt["real"]:
        if gpus > 1 or not os.path.exists("/proc/self/clear_refs"):
            raise SystemExit("--real: one process (--gpus 1) on Linux only")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:    # freed tensors go back to the system
            os.execve(sys.executable, [sys.executable] + sys.argv,
                      {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    t0 = time.time()
    r = estimate(cfg, gpus, opt["n_layers"], opt["quick"])
    fsdp = cfg.fsdp and gpus > 1
    how = "FSDP2" if fsdp else "DDP" if gpus > 1 else "one GPU"
    precision = "pure bf16" if cfg.pure_bf16 else f"fp32 weights + {cfg.dtype} compute"
    print(f"{cfg.mode} step: {gpus} x {opt['gpu_memory']:g} GiB, {how}, {precision}, activation "
          f"checkpointing {'on' if cfg.activation_checkpointing else 'off'}, {cfg.docs_per_step} docs "
          f"x {cfg.seq_len} tokens, {r['n_micro']} micro-batch(es) of {cfg.micro_batch_size} per GPU")
    for name in ("parameters", "gradients", "optimizer", "activations"):
        label = "activations/temporaries" if name == "activations" else name + (" state" if name == "optimizer" else "")
        print(f"  {label:<24} {r[name] / GiB:8.2f} GiB")
    peak = r["total"] / GiB
    print(f"peak memory per GPU: {peak:.2f} GiB")
    headroom = opt["gpu_memory"] - peak
    print(f"{'fits' if headroom >= MARGIN else 'does not fit'}: {headroom:+.2f} GiB left of "
          f"{opt['gpu_memory']:g} GiB, against {MARGIN:g} GiB kept for what is not modelled")
    counted = r["flops"] * gpus
    tokens = r["processed"] * gpus
    print(f"FLOPs per step: {r['model_flops'] / 1e12:,.1f} TFLOP model (analytic), "
          f"{counted / 1e12:,.1f} TFLOP counted (FlopCounterMode, recompute included)")
    print(f"tokens per step: {r['text_tokens']:,} text tokens trained on, {tokens:,} through the "
          f"model (sampling included)")
    seconds = r["model_flops"] / (gpus * opt["peak_tflops"] * 1e12 * opt["mfu"])
    print(f"step time: {seconds:.2f} s at {opt['peak_tflops']:g} TFLOP/s per GPU and MFU "
          f"{opt['mfu']:g} (model FLOPs / (GPUs x peak x MFU))")
    if opt["real"]:
        t1 = time.time()
        real, live = real_step(cfg, model_args_of(cfg, opt["n_layers"]))
        grew = r["total"] - r["held"]
        print(f"real CPU step: {real / GiB:.3f} GiB above the weights and AdamW state, estimated "
              f"{grew / GiB:.3f} GiB ({grew / real - 1:+.1%}); its live tensors {live / GiB:.3f} GiB "
              f"({grew / live - 1:+.1%}); the peak with them {(r['held'] + real) / GiB:.2f} GiB, "
              f"estimated {r['total'] / GiB:.2f} GiB ({r['total'] / (r['held'] + real) - 1:+.1%}); "
              f"measured in {time.time() - t1:.0f} s")
    print(f"not modelled: allocator fragmentation, CUDA context, NCCL buffers, CUDA vs CPU SDPA "
          f"backend and autocast differences (estimated in {time.time() - t0:.0f} s on fake tensors)")


if __name__ == "__main__":
    main(sys.argv[1:])
