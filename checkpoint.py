"""
Training checkpoints that survive a kill at any instant.

A checkpoint is a directory: the model (model.safetensors + config.json [+ quietstar.json]),
state.json (settings and step), optimizer.rankN.pt per process, the tokenizer.model the run
used, and last of all manifest.json (the step and every file's size). A directory without a
valid manifest, or whose files do not have the sizes it lists, is incomplete and never used.

Rotation, in out_dir (train.py calls save_checkpoint):
    1. write ckpt.tmp/ completely, manifest last (fsync'd)
    2. remove ckpt.old/ (a leftover of an interrupted rotation), manifest first
    3. rename ckpt -> ckpt.old, then ckpt.tmp -> ckpt
    4. remove ckpt.old/
A kill -9 between any two system calls leaves at least one complete checkpoint among ckpt,
ckpt.old and ckpt.tmp, and `tidy` (run before resuming or saving) finishes or undoes the
interrupted rotation: the newest complete one becomes ckpt, partial ones are deleted.
`python tests/crash_test.py` kills training at random instants to check this.
"""

import json
import os
import shutil
import time

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
NAMES = ("ckpt", "ckpt.old", "ckpt.tmp")


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path, step):
    """Seal a fully written checkpoint directory: every file flushed to disk, then the manifest."""
    files = {}
    for name in sorted(os.listdir(path)):
        if name != MANIFEST and not name.endswith(".tmp"):
            fsync_file(os.path.join(path, name))
            files[name] = os.path.getsize(os.path.join(path, name))
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    fsync_dir(path)


def inspect(path):
    """(step, None) if path is a complete checkpoint directory, else (None, what is wrong with
    it, naming the file): no manifest (a save that did not finish), a manifest that is not
    JSON, or a file it lists that is missing or has another size (truncated, or changed after
    saving)."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        return None, f"{path}: no {MANIFEST} (a save that did not finish)"
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        step = int(manifest["step"])
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{manifest_file}: not a valid manifest ({type(e).__name__}: {e})"
    for name, size in files.items():
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual is None:
            return None, f"{file}: missing (listed in {MANIFEST})"
        if actual != size:
            return None, f"{file}: {actual:,} bytes, {MANIFEST} says {size:,} (truncated, or changed after saving)"
    return step, None


def complete_step(path):
    """The step of a complete checkpoint directory, or None if it is missing or partial."""
    try:
        return inspect(path)[0] if os.path.isdir(path) else None
    except OSError:                           # removed or renamed meanwhile (another process)
        return None


def remove_dir(path):
    """Delete a checkpoint directory, its manifest first: a half-deleted one is never 'complete'."""
    if os.path.lexists(os.path.join(path, MANIFEST)):
        os.remove(os.path.join(path, MANIFEST))
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):                # a file where a directory should be
        os.remove(path)


def newest(out_dir):
    """(path, step) of the newest complete checkpoint in out_dir, or None. Changes nothing."""
    found = [(complete_step(os.path.join(out_dir, n)), -i, os.path.join(out_dir, n))
             for i, n in enumerate(NAMES)]
    found = [f for f in found if f[0] is not None]
    if not found:
        return None
    step, _, path = max(found)            # the newest; on a tie ckpt before ckpt.old before .tmp
    return path, step


def tidy(out_dir):
    """Finish or undo an interrupted rotation: the newest complete checkpoint becomes
    out_dir/ckpt, everything else is removed. Returns (path, step) of ckpt, or None."""
    best = newest(out_dir)
    final = os.path.join(out_dir, "ckpt")
    if best is not None and best[0] != final:
        remove_dir(final)                     # older or partial
        os.replace(best[0], final)
        fsync_dir(out_dir)
    for name in NAMES[1:]:
        if os.path.lexists(os.path.join(out_dir, name)):
            remove_dir(os.path.join(out_dir, name))
    return (final, best[1]) if best else None


def resume_state(out_dir, master=True):
    """state.json of the checkpoint to resume from: the newest complete one, which the master
    process makes out_dir/ckpt (the others only read, retrying while it renames). Without a
    complete one nothing is changed, and the error names each damaged file."""
    from model import read_json
    for attempt in range(20):
        try:
            found = newest(out_dir) if os.path.isdir(out_dir) else None
            if found is not None:
                found = tidy(out_dir) if master else found
                if not master:
                    read_json(os.path.join(found[0], "state.json"))
            break
        except FileNotFoundError:
            time.sleep(0.5)
    if found is None:                         # nothing was changed; say what is damaged
        damaged = damaged_checkpoints(out_dir) if os.path.isdir(out_dir) else []
        if damaged:
            raise SystemExit("; ".join(damaged) + f"\nso {out_dir} holds no complete checkpoint to resume "
                             f"from (nothing was changed)")
        raise SystemExit(f"{out_dir}: no complete checkpoint to resume from (looked for ckpt, "
                         f"ckpt.old and ckpt.tmp with a {MANIFEST})")
    state = read_json(os.path.join(found[0], "state.json"), required=("config", "step"))
    if not isinstance(state["config"], dict) or not isinstance(state["step"], int):
        raise ValueError(f"{found[0]}/state.json: config should be an object and step an integer")
    return state


def damaged_checkpoints(out_dir):
    """What is wrong with each checkpoint directory in out_dir that was sealed by a manifest."""
    paths = [os.path.join(out_dir, n) for n in NAMES]
    return [inspect(p)[1] for p in paths if os.path.lexists(os.path.join(p, MANIFEST))]


def refuse_used_out_dir(out_dir, resume, overwrite):
    """A fresh run does not overwrite a checkpoint (even a damaged one, which its owner may
    want to repair) or mix its metrics with another run's."""
    if resume or overwrite or not os.path.isdir(out_dir):
        return
    found = newest(out_dir)
    if found:
        raise SystemExit(f"{out_dir} already holds a checkpoint (step {found[1]}): continue it with "
                         f"--init_from=resume, start over with --overwrite=True, or use another --out_dir")
    damaged = damaged_checkpoints(out_dir)
    if damaged:
        raise SystemExit(f"{out_dir} holds a damaged checkpoint ({damaged[0]}):\n"
                         f"start over with --overwrite=True, or use another --out_dir")


def prepare_out_dir(out_dir, resume, overwrite, start_step, master, run_id=""):
    """Just before training; returns the metrics file the run appends to.
    A fresh run that replaces an earlier one (only with overwrite, see refuse_used_out_dir)
    removes nothing yet: it logs to metrics.jsonl.new-RUN_ID, and its first save replaces the
    earlier checkpoint (the rotation) and then the earlier metrics (finish_replacing), so a
    run that fails before its first save leaves the earlier run whole. A resumed run adopts
    the metrics of the replacement its checkpoint belongs to (a kill between those two steps),
    drops other leftovers, and drops the metrics of steps after its checkpoint (a killed run
    logged steps it never saved)."""
    refuse_used_out_dir(out_dir, resume, overwrite)
    metrics_file = os.path.join(out_dir, "metrics.jsonl")
    if not master or not os.path.isdir(out_dir):
        return metrics_file
    leftovers = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith("metrics.jsonl.new-")]
    if not resume:
        if newest(out_dir) is not None or damaged_checkpoints(out_dir):   # kept until the first save
            return f"{metrics_file}.new-{run_id}"
        for path in [os.path.join(out_dir, n) for n in NAMES] + leftovers + [metrics_file]:
            if os.path.isdir(path):                      # unsealed: a save that never finished
                remove_dir(path)
            elif os.path.lexists(path):
                os.remove(path)
        return metrics_file
    for path in leftovers:
        if run_id and path.endswith(f".new-{run_id}"):
            os.replace(path, metrics_file)
        else:
            os.remove(path)
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            kept = [line for line in f if logged_step(line) <= start_step]
        with open(metrics_file + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_file + ".tmp", metrics_file)
    return metrics_file


def finish_replacing(out_dir, run_id):
    """After a replacing run's first save (its checkpoint is in place): its metrics become
    metrics.jsonl, and the earlier run's are gone."""
    os.replace(os.path.join(out_dir, f"metrics.jsonl.new-{run_id}"), os.path.join(out_dir, "metrics.jsonl"))
    for name in os.listdir(out_dir):                   # another failed replacement's
        if name.startswith("metrics.jsonl.new-"):
            os.remove(os.path.join(out_dir, name))


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def remove_file(path):
    if os.path.exists(path):
        os.remove(path)


def remove_if_empty(out_dir):
    """Remove an out_dir that holds nothing but an empty metrics.jsonl."""
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {"metrics.jsonl"} and \
            all(os.path.getsize(os.path.join(out_dir, f)) == 0 for f in os.listdir(out_dir)):
        shutil.rmtree(out_dir)


def read_quietstar_config(path):
    """The QuietStarConfig in a checkpoint's quietstar.json (None if it has none), checked:
    valid JSON, known keys, values of the right type (for QuietStar.from_pretrained)."""
    from dataclasses import fields

    from model import read_json
    from quietstar import QuietStarConfig
    file = os.path.join(path, "quietstar.json")
    if not os.path.isfile(file):
        return None
    values = read_json(file)
    kinds = {f.name: f.type for f in fields(QuietStarConfig)}
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is None:
            raise ValueError(f"{file}: unknown setting {name!r}")
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise ValueError(f"{file}: {name} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return QuietStarConfig(**values)


# -----------------------------------------------------------------------------
# what goes into a checkpoint

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


def load_optimizer_state(optimizer, file, device):
    from torch.distributed.tensor import DTensor
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{file}: optimizer state missing (was the run saved with another "
                         f"number of processes?)") from None
    except Exception as e:
        raise SystemExit(f"{file}: not a readable weights-only optimizer file "
                         f"({str(e).splitlines()[0]})") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(state.get("state", {})) > len(params):
        raise SystemExit(f"{file}: optimizer state for {len(state['state'])} parameters, "
                         f"the model has {len(params)}")
    for i, per_param in state["state"].items():
        p = params[int(i)]
        for k, v in per_param.items():
            if isinstance(p, DTensor) and v.dim() > 0:
                per_param[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)


def weights_are_finite(model, world_size):
    """Every parameter finite, on every process (each checks its own shard)."""
    finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                 for p in model.parameters())
    if world_size > 1:
        flag = torch.tensor([int(finite)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def save_checkpoint(model, optimizer, settings, step, rank, world_size, fsdp, tokenizer_file, run_id=""):
    """Write out_dir/ckpt for `step` by the rotation above. A failed write (disk full,
    permission) removes its partial files, keeps the previous checkpoint and stops the run
    with the path and the reason."""
    out_dir = settings["out_dir"]
    final, tmp = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "ckpt.tmp")
    state_dict = full_state_dict(model, fsdp)
    error = None
    try:
        if rank == 0:
            tidy(out_dir)                     # a leftover of an interrupted save
            os.makedirs(tmp)
            if hasattr(model, "init_thought_parameters"):   # QuietStar: the released layout
                model.save_pretrained(tmp, state_dict=state_dict)
            else:
                model.save_pretrained(tmp)
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"config": settings, "step": step, "world_size": world_size, "run_id": run_id},
                          f, indent=2)
            shutil.copyfile(tokenizer_file, os.path.join(        # a compact vocabulary, or Mistral's
                tmp, "vocab.json" if tokenizer_file.endswith(".json") else "tokenizer.model"))
    except Exception as e:            # OSError, torch's RuntimeError, SafetensorError
        error = e
    error = agree(error, world_size)
    if error is None:
        try:
            torch.save(optimizer_state(optimizer), os.path.join(tmp, f"optimizer.rank{rank}.pt"))
        except Exception as e:
            error = e
        error = agree(error, world_size)
    if error is None and rank == 0:
        try:
            write_manifest(tmp, step)
        except OSError as e:
            error = e
    error = agree(error, world_size)
    if error is not None:
        if rank == 0:
            remove_dir(tmp)
        raise SystemExit(save_error_message(tmp, final, error))
    if rank == 0:
        old = os.path.join(out_dir, "ckpt.old")
        remove_dir(old)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(out_dir)
        remove_dir(old)
    if world_size > 1:
        dist.barrier()


def agree(error, world_size):
    """With several processes: an error on any one is an error for all (so all stop together)."""
    if world_size == 1:
        return error
    flags = [None] * world_size
    dist.all_gather_object(flags, None if error is None else f"{type(error).__name__}: {error}")
    failed = [f for f in flags if f is not None]
    return error or (RuntimeError(failed[0]) if failed else None)


def save_error_message(tmp, final, error):
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    if "unexpected pos" in reason:            # torch.save's way of saying a write came up short
        reason = f"a write came up short, the disk is full or a file size limit was hit ({reason})"
    where = getattr(error, "filename", None) or tmp
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free
        space = f"; {free / 2**20:.0f} MiB free on that disk"
    except OSError:
        space = ""
    kept = f"the previous checkpoint {final} is kept" if complete_step(final) is not None \
        else "no earlier checkpoint exists"
    return (f"could not save the checkpoint: {where}: {reason}{space}.\n"
            f"The partial files were removed; {kept}.")
