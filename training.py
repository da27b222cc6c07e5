"""
training.py — what both training scripts share: one entry point for CPU, one GPU and torchrun
(`compute_init`) with its precision policy; wrapping for data parallelism (DDP, FSDP2);
the optimiser and the learning-rate schedule; atomic checkpoints that resume exactly; under
FSDP2 a model that no rank ever holds whole (built on the meta device, each rank reading its own
rows of the checkpoint), sharded torch.distributed.checkpoint checkpoints that resume with any
number of processes, a streamed Hugging Face export, and a per-GPU memory model term by term.

    from training import compute_init, prepare_run_dir, resume_checkpoint, wrap_model, build_optimizer
    compute = compute_init("auto")              # prints the device, processes and precision
    prepare_run_dir(out, resume, overwrite, outputs=["checkpoints", "metrics.jsonl"], compute=compute)
    last = resume_checkpoint(f"{out}/checkpoints") if resume else None   # newest intact step-*

Sections: 1 compute and precision · 2 freezing and wrapping (meta-device start, the dummy
vision input that DDP/FSDP need, the memory model) · 3 optimiser and schedule · 4 checkpoints
(HF folders, full and sharded training state) ·
5 the run folder: refuse to overwrite, resume from the newest intact checkpoint, the JSONL logs.
Used by train_pretrain.py and train_rl.py; imports the model, never the other way round.
"""

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import kernels
import packing
from checkpoint_files import write_json_atomic
from mimovl import MiMoVL
from processor import patchify


# -----------------------------------------------------------------------------
# 1. compute_init: one entry point for CPU, one GPU and torchrun; the precision policy

@dataclass
class Compute:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype = None    # torch.bfloat16 (autocast) or None (fp32)
    backend: str = None              # "gloo" / "nccl" under torchrun

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def eval_dtype(self):
        """Weights dtype for evaluation and generation (no autocast there): bf16 on GPUs when
        training in bf16, fp32 on CPUs (exact, and fast enough for the tiny model)."""
        return torch.bfloat16 if self.amp_dtype and self.device.type == "cuda" else torch.float32

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def print(self, *a, **kw):
        if self.master:
            print(*a, **kw, flush=True)


def fail(message):
    """A one-line error a user can act on: printed to stderr (once, by rank 0 under torchrun),
    exit status 2 (as argparse does)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def compute_init(device="auto", precision="auto", quiet=False):
    """Start torch.distributed when launched by torchrun (gloo on CPU, NCCL on GPU), pick this
    rank's device and the precision: bf16 autocast on GPUs and on CPUs with native bf16, fp32
    otherwise (printed either way)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch sees no GPU (torch.cuda.is_available() is False); use --device cpu")
    rank, local_rank, world = 0, 0, 1
    backend = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 or "RANK" in os.environ:
        backend = "nccl" if device == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, **({"device_id": dev} if device == "cuda" else {}))

    if precision == "auto":
        native = (torch.cuda.is_bf16_supported() if device == "cuda" else kernels.cpu_has_native_bf16())
        precision = "bf16" if native else "fp32"
        why = ("the GPU supports bf16" if device == "cuda" else
               "the CPU has avx512_bf16/amx" if native else "the CPU has no native bf16")
    else:
        why = "--precision"
    if precision not in ("bf16", "fp32"):
        fail(f"--precision {precision!r}: use bf16, fp32 or auto")
    c = Compute(dev, rank, local_rank, world, torch.bfloat16 if precision == "bf16" else None, backend)
    if not quiet:
        c.print(f"compute: {world} process(es) on {device}" + (f" ({backend})" if backend else "") +
                f" | precision: {'bf16 autocast, fp32 master weights' if c.amp_dtype else 'fp32'} ({why})")
    return c


def cpu_ticks(stat_line, nice_yields=True):
    """(all, idle) CPU ticks from the `cpu` line of /proc/stat (user nice system idle iowait ...).
    With nice_yields, time of low-priority processes (nice > 0) counts as idle: the scheduler
    gives their cores to a process at normal priority (a nice-19 job gets ~1.5 % of a contested
    core)."""
    t = [int(x) for x in stat_line.split()[1:]]
    return sum(t), t[3] + t[4] + (t[1] if nice_yields else 0)


def busy_cores(window_s=0.5):
    """How many cores other processes keep busy right now: the machine's non-idle share of CPU
    time over a short window (/proc/stat), times the number of cores; low-priority work does not
    count unless this process is itself low-priority. Unlike the 1-minute load average, this does
    not still count a job (a pip install, say) that ended seconds ago. Falls back to the load
    average where /proc/stat is missing."""
    def sample():
        with open("/proc/stat") as f:
            return cpu_ticks(f.readline(), nice_yields=os.nice(0) <= 0)
    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return cores * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(requested=None):
    """Torch CPU threads: --threads when given; else every core this process may use, minus the
    cores other processes keep busy (busy_cores). Intra-op threads spin at every parallel
    region, so on a busy machine 2 threads ran a step up to 10x slower than 1."""
    if requested:
        return requested, "from --threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))          # torchrun processes here
    n = max(1, min(cores, int(cores - busy + 0.5)) // per_node)
    return n, (f"{cores} cores, {busy:.1f} busy with other work, {per_node} process(es) per node; "
               "--threads N to choose")


def set_threads(compute, requested=None, phase=""):
    """Pick the torch CPU threads for the next phase (pick_threads: the cores other work leaves
    free right now), set them and print the choice and why. Called at the start of every stage or
    phase, so a long job follows the machine's load instead of a sample taken at its start."""
    if compute.device.type != "cpu":
        return None
    n, why = pick_threads(requested)
    torch.set_num_threads(n)
    compute.print(f"{phase + ': ' if phase else ''}torch CPU threads: {n} ({why})")
    return n


def all_reduce_sum(x, compute):
    if compute.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x, compute):
    if compute.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x

# -----------------------------------------------------------------------------
# 2. Freezing and wrapping for data parallelism

# Every parameter belongs to exactly one part (tested): training stages freeze and train parts.
PARTS = {
    "vit": ("visual.patch_embed.", "visual.blocks."),
    "projector": ("visual.merger.",),
    "llm": ("model.", "lm_head."),
}


def part_of(name):
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name} belongs to no part of {list(PARTS)}")


def set_trainable(model, parts):
    """requires_grad = True exactly on the parameters of `parts` (PARTS); returns the trainable count."""
    for p in parts:
        if p not in PARTS:
            fail(f"unknown model part {p!r} in --trainable; choose from {', '.join(PARTS)}")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in parts)
        n += p.numel() if p.requires_grad else 0
    return n


def wrap_model(trainee, compute, fsdp=False, weights=None):
    """DDP (a full replica per rank) for small models; FSDP2 (`fully_shard` every ViT block, LM
    layer, the projector, the patch and token embeddings, then the root) for large ones, with bf16
    compute and fp32 gradient reduction. Single process: the module itself.

    Under FSDP2 the trainee may be built on the meta device (`meta_model`), so that no rank ever
    holds the whole fp32 model: after sharding, each rank allocates only its own shards and
    fills them (`fill_shards`) from the checkpoint folder `weights`, reading only the rows it owns;
    parameters that were already real before wrapping (a fresh projector, a training head) keep
    their values. With `weights=None` the shards stay uninitialised for load_training_state."""
    if not compute.distributed:
        return trainee
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute.amp_dtype, reduce_dtype=torch.float32)
        model = trainee if isinstance(trainee, MiMoVL) else trainee.model   # e.g. MiMoVL + a head
        on_meta = any(p.is_meta for p in trainee.parameters())
        real = {n: t.detach().clone() for n, t in trainee.state_dict().items()
                if on_meta and not t.is_meta}
        units = [*model.visual.blocks, model.visual.merger, model.visual.patch_embed,
                 *model.model.layers, model.model.embed_tokens]
        for m in units:
            fully_shard(m, mp_policy=mp)
        # lm_head stays in the root unit: the loss reads lm_head.weight directly
        fully_shard(trainee, mp_policy=mp)
        if on_meta:
            trainee.to_empty(device=compute.device)
            fill_shards(trainee, weights, real)
        return trainee
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [compute.device.index] if compute.device.type == "cuda" else None
    return DDP(trainee, device_ids=ids)


def meta_model(folder, cls=MiMoVL):
    """A MiMoVL (or subclass `cls`, e.g. train_rl's Policy) built from `folder`'s config.json on
    the meta device: no memory until wrap_model shards it (or `.to_empty` allocates it for
    load_training_state)."""
    from mimovl import MiMoVLConfig
    from checkpoint_files import read_json_file
    cfg = MiMoVLConfig.from_hf_dict(read_json_file(os.path.join(folder, "config.json")),
                                    source=os.path.join(folder, "config.json"))
    with torch.device("meta"):
        return cls(cfg)


def local_rows(t):
    """(first, end) rows of dimension 0 that this rank holds of the FSDP2-sharded DTensor `t`
    (Shard(0) as torch.chunk cuts: ceil(n / world) rows per rank, the last ranks may hold
    fewer or none); (0, n) for a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(t, DTensor):
        return 0, t.shape[0] if t.ndim else 1
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise NotImplementedError(f"only FSDP2's Shard(0) placement is supported, not {t.placements}")
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    per = -(-n // world)
    first, end = min(n, rank * per), min(n, (rank + 1) * per)
    assert t.to_local().shape[0] == end - first, "internal error: FSDP2 sharded differently"
    return first, end


@torch.no_grad()
def fill_shards(trainee, folder, real):
    """Fill this rank's shards of a sharded trainee: the MiMoVL's tensors from the safetensors
    files of the HF folder `folder` (safe_open slices: only the rows this rank owns are read,
    one tensor at a time), the tensors in `real` (name -> full tensor) by slicing them. Strict:
    every tensor must be filled, every checkpoint key used (mimovl's ignorable keys aside).
    `folder` may also be a towers_plan's {parameter: (file, key)} (--init-vit / --init-lm), or
    None: then only `real` is filled (the rest comes from a sharded checkpoint)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from mimovl import IGNORABLE_KEY_PREFIXES, IGNORABLE_KEY_SUFFIXES, canonical_key, checkpoint_shards
    path, mimo = next((n, m) for n, m in trainee.named_modules() if isinstance(m, MiMoVL))
    prefix = path + "." if path else ""
    targets = trainee.state_dict()
    if mimo.cfg.text.tie_word_embeddings:
        targets.pop(prefix + "lm_head.weight", None)          # the embedding is the head

    def put(name, read):
        t = targets.pop(name)
        first, end = local_rows(t)
        local = t.to_local() if isinstance(t, DTensor) else t
        local.copy_(read(first, end).reshape(local.shape))     # cast to fp32 if stored in bf16

    for name in [n for n in targets if n in real]:
        put(name, lambda a, b, name=name: real[name][a:b] if real[name].ndim else real[name])
    if isinstance(folder, dict):    # a towers_plan's {parameter: (file, key)}, checked by towers_plan
        for name, (file, key) in folder.items():
            if prefix + name in targets:
                with safe_open(file, framework="pt", device="cpu") as f:
                    put(prefix + name, lambda a, b: f.get_slice(key)[a:b])
        return
    unexpected, mis_shaped, files = [], [], {}
    for shard in checkpoint_shards(folder) if folder is not None else []:
        with safe_open(os.path.join(folder, shard), framework="pt", device="cpu") as f:
            files.update({key: os.path.join(folder, shard) for key in f.keys()})
    for key, file in files.items():
        name = prefix + canonical_key(key)
        if key.startswith(IGNORABLE_KEY_PREFIXES) or key.endswith(IGNORABLE_KEY_SUFFIXES):
            continue
        if name not in targets:
            if name not in real:
                unexpected.append(key)
            continue
        # opened per tensor: the file's pages that a slice touches leave this process's memory
        # when it closes, instead of piling up to a whole shard file per rank
        with safe_open(file, framework="pt", device="cpu") as f:
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(targets[name].shape):
                mis_shaped.append(f"{key}: checkpoint {shape} vs model {tuple(targets.pop(name).shape)}")
                continue
            put(name, lambda a, b: f.get_slice(key)[a:b])
    if folder is not None and (targets or unexpected or mis_shaped):
        problems = [f"{len(v)} {what} key(s): {', '.join(sorted(v)[:20])}" for what, v in
                    (("missing", targets), ("unexpected", unexpected), ("wrong shape", mis_shaped)) if v]
        raise ValueError(f"checkpoint {folder} does not match the model built from its config.json: "
                         + "; ".join(problems))


def add_dummy_vision(row, processor, video=False):
    """Append a 56x56 black image (and, with video=True, a 2-frame black video) as one unlabelled
    document when the row has none. DDP and FSDP need every rank to use the same parameters in
    every step, and FSDP2 needs every rank to call the vision tower the same number of times
    (once for the images, once for the videos) so that the all-gathers pair up. The document adds
    no loss and no gradient."""
    need_image = row.get("pixel_values") is None
    need_video = video and row.get("pixel_values_videos") is None
    if not (need_image or need_video):
        return row
    tok = processor.tokenizer
    start, end = tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")
    black = patchify(torch.zeros(2, 3, 56, 56))[0]            # (16, 1176): 4 merged tokens
    ids, out = [], dict(row)
    if need_image:
        ids += [start] + [processor.image_token_id] * 4 + [end]
        out["pixel_values"], out["image_grid_thw"] = black, torch.tensor([[1, 4, 4]])
    if need_video:
        ids += [start] + [processor.video_token_id] * 4 + [end]
        out["pixel_values_videos"], out["video_grid_thw"] = black, torch.tensor([[1, 4, 4]])
        out["second_per_grid_ts"] = torch.tensor([1.0])
    ids = torch.tensor(ids, dtype=row["input_ids"].dtype)[None]
    out["input_ids"] = torch.cat([row["input_ids"], ids], dim=1)
    out["labels"] = torch.cat([row["labels"], torch.full_like(ids, packing.IGNORE_INDEX)], dim=1)
    out["cu_seqlens"] = torch.cat([row["cu_seqlens"], row["cu_seqlens"][-1:] + ids.shape[1]])
    return out


def unwrap(wrapped):
    return wrapped.module if hasattr(wrapped, "module") else wrapped


def grad_sync(wrapped, sync):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of a step. FSDP2 reduces
    (reduce-scatters) after every micro-batch and accumulates the sharded fp32 gradients: skipping
    it (set_requires_gradient_sync(False)) would keep every unit's *unsharded* fp32 gradient until
    the last micro-batch, 4 B per trainable parameter on every GPU (31 GiB at 7B), far more than
    the extra reduce-scatters cost."""
    if hasattr(wrapped, "no_sync"):                              # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    return contextlib.nullcontext()


def memory_estimate_gib(cfg, world_size, seq_len, trainable=("vit", "projector", "llm"), image_share=0.5):
    """Per-GPU memory of one pre-training step under FSDP2 (wrap_model) with gradient
    checkpointing and bf16 autocast, term by term, in GiB (a dict; "total" is their sum).
    `seq_len` tokens per packed row, one row per micro-batch (gradients are reduce-scattered
    after each, grad_sync, so the number of micro-batches does not matter); `image_share` of a row's tokens are merged image tokens (4 ViT patches each).
    An estimate from the code's data flow, not a measurement:

    sharded over the ranks: fp32 master weights (4 B / parameter), fp32 AdamW moments (8 B) and
    the fp32 sharded gradients (4 B) of the trainable parameters;
    not sharded: the bf16 copies all-gathered for the unit that runs
    and the one prefetched (2 x the largest LM layer) and the root unit's lm_head, which stays
    gathered from the loss to the end of backward; the bf16 inputs of every LM layer and ViT
    block kept for gradient checkpointing; one LM layer's and one ViT block's recomputed working
    set in backward (~16 B x tokens x MLP width); the chunked cross-entropy
    (kernels.linear_cross_entropy): one bf16 chunk of logits (<= 1 GiB), the fp32 dWeight
    accumulator of lm_head (held from forward to backward) and the bf16 dHidden."""
    with torch.device("meta"):
        model = MiMoVL(cfg)
    n = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for name, p in model.named_parameters() if part_of(name) in trainable)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    t, v = cfg.text, cfg.vision
    patches = 4 * int(image_share * seq_len)
    chunk_rows = min(seq_len, kernels.default_chunk_rows(seq_len, t.vocab_size, 2))   # as the loss cuts it
    head_trainable = "llm" in trainable
    b = {
        "weights fp32 (sharded)": 4 * n / world_size,
        "AdamW moments fp32 (sharded)": 8 * n_train / world_size,
        "gradients fp32 (sharded)": 4 * n_train / world_size,
        "gathered bf16 layers (running + prefetched)": 2 * 2 * layer,
        "gathered bf16 lm_head (root unit)": 2 * t.vocab_size * t.hidden_size,
        "LM layer inputs bf16 (checkpointed)": 2 * seq_len * t.hidden_size * t.num_hidden_layers,
        "ViT block inputs bf16 (checkpointed)": 2 * patches * v.hidden_size * v.depth,
        "LM layer working set (backward)": 16 * seq_len * t.intermediate_size,
        "ViT block working set (backward)": 16 * patches * v.intermediate_size,
        "cross-entropy logits chunk bf16": 2 * chunk_rows * t.vocab_size,
        "cross-entropy dWeight accumulator fp32": 4 * t.vocab_size * t.hidden_size if head_trainable else 0,
        "cross-entropy dHidden bf16": 2 * seq_len * t.hidden_size,
    }
    gib = {k: x / 2 ** 30 for k, x in b.items()}
    gib["total"] = sum(gib.values())
    return gib


def rl_memory_estimate_gib(cfg, world_size, row_tokens, rollout_rows, rollout_tokens, rm_here=False):
    """Per-GPU memory of MORL under FSDP2 (train_rl.py --fsdp), in GiB, for each of its two
    phases (a dict of two memory_estimate_gib-style dicts):

    update   a pre-training step on packed rows of `row_tokens` tokens (memory_estimate_gib, all
             parts trainable, text rows): the sharded states plus the activations of one row
    rollout  the sharded fp32 weights and AdamW moments (the gradients are freed), the bf16 copy
             gathered for sampling (train_rl.rollout_weights) and the KV cache of one generate
             call: `rollout_rows` sequences (G per prompt) of `rollout_tokens` (prompt + response)
             each, 2 (K, V) x layers x KV heads x head_dim in bf16 (MiMoVL's preallocated KVCache)

    rm_here adds a bf16 reward model to both (--rm-device on the rank's own GPU)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in MiMoVL(cfg).parameters())
    t = cfg.text
    update = {k: v for k, v in memory_estimate_gib(cfg, world_size, row_tokens, image_share=0.0).items()
              if k != "total"}
    rollout = {k: update[k] for k in ("weights fp32 (sharded)", "AdamW moments fp32 (sharded)")}
    rollout["rollout copy bf16 (gathered)"] = 2 * n / 2 ** 30
    rollout["KV cache bf16 (one generate call)"] = (2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
                                                    * 2 * rollout_rows * rollout_tokens / 2 ** 30)
    for phase in (update, rollout):
        if rm_here:
            phase["reward model bf16"] = 2 * n / 2 ** 30
        phase["total"] = sum(phase.values())
    return {"update": update, "rollout": rollout}


def format_memory(gib):
    """The terms of memory_estimate_gib, one per line, largest first."""
    terms = sorted(((k, x) for k, x in gib.items() if k != "total"), key=lambda kv: -kv[1])
    return "\n".join([f"      {x:7.2f} GiB  {k}" for k, x in terms if x > 0] +
                     [f"      {gib['total']:7.2f} GiB  total"])

# -----------------------------------------------------------------------------
# 3. Optimiser and schedule

def build_optimizer(trainee, lr, weight_decay, betas, device):
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings.
    Fused kernel on GPU."""
    decay, no_decay = [], []
    for name, p in trainee.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters in this stage; check --trainable")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8,
                             fused=device.type == "cuda" or None)


def lr_at(step, lr, min_lr, warmup, steps):
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at step `steps`.
    `step` counts optimiser steps already taken (0 for the first)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# 4. Checkpoints: HF folders and resumable training state (safetensors + JSON, atomic)

def atomic_dir(final):
    """A fresh temporary folder beside `final`; `commit_dir` renames it into place."""
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp, final):
    """Replace `final` by `tmp` with renames only: a crash leaves either the old or the new
    folder under the real name, never a half-written one."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def full_state(wrapped):
    """The full (unsharded) model and optimiser-free state dict on rank 0, CPU tensors, FQNs
    without DDP's `module.` prefix; other ranks get {}. Works for plain, DDP and FSDP2 models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_model(path, state, cfg, dtype=None):
    """Save a MiMoVL state dict with MiMoVL.save_pretrained (config.json + safetensors)."""
    with torch.device("meta"):
        m = MiMoVL(cfg)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    if cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        m.lm_head.weight = nn.Parameter(torch.empty(0))             # re-tied below
    missing, unexpected = m.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.text.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"internal error: state does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    if cfg.text.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m.save_pretrained(path)


def save_stage_folder(path, state, cfg, processor, record, dtype=None, extra=None):
    """A stage's output: a Hugging Face folder (weights, config, tokenizer, chat template,
    preprocessor and generation configs) plus pretrain_stage.json, written atomically. `extra`
    (the 0-vit head) goes to extra.safetensors, which loaders of the model ignore."""
    tmp = atomic_dir(path)
    write_model(tmp, state, cfg, dtype)
    _stage_files(tmp, cfg, processor, record, extra)
    commit_dir(tmp, path)


def _stage_files(tmp, cfg, processor, record, extra):
    """What a stage folder holds beside the model's weights and config.json."""
    from safetensors.torch import save_file
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(tmp, "extra.safetensors"))
    processor.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "generation_config.json"),
                {"eos_token_id": processor.eos_token_ids, "pad_token_id": processor.pad_token_id,
                 "bos_token_id": cfg.bos_token_id, "do_sample": False})
    write_json_atomic(os.path.join(tmp, "pretrain_stage.json"), record)


def save_stage_streamed(path, wrapped, cfg, processor, record, compute, dtype=None, split=None,
                        max_shard_bytes=5 * 1024 ** 3):
    """save_stage_folder for an FSDP2 model without the full state dict: the parameters are
    gathered one at a time (DTensor.full_tensor) and rank 0 writes them into safetensors shards
    of at most `max_shard_bytes` (with model.safetensors.index.json when there are several), so
    no rank holds more than one shard and one tensor of the exported model. Same folder as
    save_stage_folder; all ranks call this. `split` as in save_training_state."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    tmp = gather_objects(atomic_dir(path) if compute.master else None, compute)[0]
    dtype = dtype or torch.float32
    parts, current, size, extra = [], {}, 0, {}

    def flush(tensors):
        name = f"part-{len(parts):05d}.safetensors"
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        parts.append((name, sorted(tensors), sum(v.numel() * v.element_size() for v in tensors.values())))

    for name, t in wrapped.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t        # all ranks take part
        if not compute.master:
            continue
        full = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype).contiguous()
        weights, head = split({name: full}) if split else ({name: full}, {})
        extra.update(head)
        for key, v in weights.items():
            if cfg.text.tie_word_embeddings and key == "lm_head.weight":
                continue                                                   # the embedding is the head
            n = v.numel() * v.element_size()
            if current and size + n > max_shard_bytes:
                flush(current)
                current, size = {}, 0
            current[key] = v
            size += n
    if compute.master:
        flush(current)
        if len(parts) == 1:
            os.rename(os.path.join(tmp, parts[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            for i, (part, keys, _) in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                os.rename(os.path.join(tmp, part), os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
            write_json_atomic(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": weight_map})
        write_json_atomic(os.path.join(tmp, "config.json"),
                   {**cfg.to_hf_dict(), "torch_dtype": str(dtype).replace("torch.", "")})
        _stage_files(tmp, cfg, processor, record, extra)
        commit_dir(tmp, path)
    compute.barrier()


def rng_state(compute):
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if compute.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(compute.device)
    return s


def set_rng_state(s, compute):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and compute.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], compute.device)


def gather_objects(obj, compute):
    if not compute.distributed:
        return [obj]
    out = [None] * compute.world_size
    dist.all_gather_object(out, obj)
    return out


def save_training_state(root, step, wrapped, optimizer, cfg, processor, loader_state, compute,
                        keep_last, meta, split=None):
    """checkpoints/<stage>/step-NNNNNN/: the model (HF folder, fp32), extra.safetensors (e.g. the
    0-vit head), optimizer.safetensors (AdamW moments keyed by parameter name), rng.safetensors
    (torch/CUDA generator states of every rank) and trainer_state.json (step, optimiser groups,
    data position and Python/NumPy RNG of every rank). All ranks call this (FSDP gathers).
    `split(state) -> (MiMoVL weights, extra weights)` separates a training head from the model.
    An FSDP2 model is saved sharded instead (save_sharded_state): nothing is gathered."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if is_sharded(wrapped):
        return save_sharded_state(root, step, wrapped, optimizer, cfg, processor, loader_state, compute,
                                  keep_last, meta)
    state = full_state(wrapped)
    osd = get_optimizer_state_dict(wrapped, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = gather_objects(rng_state(compute), compute)
    loaders = gather_objects(loader_state, compute)
    if compute.master:
        final = os.path.join(root, f"step-{step:06d}")
        tmp = atomic_dir(final)
        model_state, extra = split(state) if split else (state, {})
        write_model(tmp, model_state, cfg)
        if extra:
            save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(tmp, "extra.safetensors"))
        opt_tensors = {f"{name}::{k}": v.detach().cpu().contiguous()
                       for name, st in osd["state"].items() for k, v in st.items()}
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in osd["param_groups"]]
        _rng_and_state(tmp, step, compute, rngs, loaders, {"param_groups": groups, **meta})
        processor.save_pretrained(tmp)          # so an intermediate checkpoint is a usable folder
        commit_dir(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    compute.barrier()


def is_sharded(wrapped):
    """True for an FSDP2 model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in wrapped.parameters())


def is_sharded_checkpoint(path):
    """A checkpoint written by save_sharded_state: its model weights are in dcp/, not in an HF
    folder, so load_training_state restores them."""
    return os.path.isdir(os.path.join(path, "dcp"))


COMPLETE = "COMPLETE"      # the last file a sharded checkpoint writes: without it, it is ignored


def _rng_and_state(tmp, step, compute, rngs, loaders, extra):
    """rng.safetensors and trainer_state.json of a checkpoint (rank 0)."""
    from safetensors.torch import save_file
    rng_tensors = {}
    for r, s in enumerate(rngs):
        rng_tensors[f"rank{r}.torch"] = s["torch"]
        if "cuda" in s:
            rng_tensors[f"rank{r}.cuda"] = s["cuda"]
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    write_json_atomic(os.path.join(tmp, "trainer_state.json"), {
        "step": step, "world_size": compute.world_size, **extra, "loader": loaders,
        "python_rng": [[s["python"][0], list(s["python"][1]), s["python"][2]] for s in rngs],
        "numpy_rng": [[s["numpy"][0], s["numpy"][1].tolist(), *s["numpy"][2:]] for s in rngs]})


def save_sharded_state(root, step, wrapped, optimizer, cfg, processor, loader_state, compute,
                       keep_last, meta):
    """checkpoints/<stage>/step-NNNNNN/ of an FSDP2 run: dcp/ (torch.distributed.checkpoint:
    each rank writes its own shards of the model and of the AdamW moments, rank 0 the metadata),
    rng.safetensors + trainer_state.json as save_training_state, config.json and the tokenizer.
    Atomic: all ranks write into rank 0's temporary folder, rank 0 writes COMPLETE last and
    renames the folder; a folder without COMPLETE is never resumed from. DCP reshards on load,
    so a run may resume with any number of processes (load_training_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(root, f"step-{step:06d}")
    tmp = gather_objects(atomic_dir(final) if compute.master else None, compute)[0]
    model_state, optim_state = get_state_dict(wrapped, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
    rngs = gather_objects(rng_state(compute), compute)
    loaders = gather_objects(loader_state, compute)
    if compute.master:
        _rng_and_state(tmp, step, compute, rngs, loaders, {"format": "dcp", **meta})
        write_json_atomic(os.path.join(tmp, "config.json"), cfg.to_hf_dict())
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"step {step}, {compute.world_size} process(es)\n")
        commit_dir(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    compute.barrier()


def rank_loader_state(saved, rank, world_size, log=print):
    """This rank's data position from the positions that all ranks of a checkpoint saved, for a
    run with `world_size` processes. Same world size: its own, exactly. A step-keyed state (stage
    0-vit: the same for every rank) is the same for any number.

    Otherwise the data is cut into units that rank r of W reads in turn: units r, r + W, r + 2W,
    ... (PackedLoader's chunks: {"chunk", "row"}; RL's prompt stream: {"position"}). The new run
    starts every rank at the first unit U that no old rank has started, rounded up to a multiple
    of the new number of processes: rank r' of W' then reads U + r', U + r' + W', ... Where the old
    ranks stood together at a boundary that the new split can express (all at the start of chunk
    c, and W' divides c x W), nothing is skipped and the run continues exactly as one that was
    never stopped; otherwise the units that some rank had not reached, and the rest of any
    partly read chunk, are skipped (said in one line): the data order cannot be reproduced
    across a change of split without packing every chunk on every rank."""
    if len(saved) == world_size:
        return saved[rank]
    if all(s == saved[0] and set(s) == {"step"} for s in saved):
        return saved[0]
    old = len(saved)
    if all(isinstance(s, dict) and "chunk" in s and "row" in s for s in saved):
        started = [s["chunk"] + (s["row"] > 0) for s in saved]       # units each old rank began
        key = "chunk"
    elif all(isinstance(s, dict) and "position" in s for s in saved):
        started = [s["position"] for s in saved]
        key = "position"
    else:
        fail(f"cannot resume with {world_size} process(es): the checkpoint was written by {old}, "
             f"and its data position is not one this code can split; resume with {old} process(es)")
    first_free = max(r + (n - 1) * old + 1 for r, n in enumerate(started))
    start = -(-first_free // world_size)                              # units per new rank read
    skipped_units = start * world_size - sum(started)
    partial = sum(key == "chunk" and s["row"] > 0 for s in saved)
    if rank == 0:
        what = "data chunk" if key == "chunk" else "prompt"
        lost = ([f"{skipped_units} {what}(s) that no rank had read"] if skipped_units else []) + (
            [f"the rest of {partial} partly read chunk(s)"] if partial else [])
        log(f"resuming with {world_size} process(es) from a checkpoint of {old}: every rank starts at "
            f"{what} {start * world_size} of the global order; " +
            (" and ".join(lost) + " are skipped" if lost else "nothing is skipped"))
    state = dict(saved[rank % old], rank=rank, world_size=world_size)
    state[key] = start
    if "easy" in state:                          # RL's easy pool: each old rank's goes to one new rank
        state["easy"] = [i for r in range(rank, old, world_size) for i in saved[r]["easy"]]
    if key == "chunk":
        state.pop("dataset", None)               # a cache of the mixture's counts at the old position
        state.update(row=0, skipped=sum(s["skipped"] for s in saved) if rank == 0 else 0,
                     too_long=sum(s["too_long"] for s in saved) if rank == 0 else 0)
    return state


def load_sharded_state(path, wrapped, optimizer, ts):
    """Model and optimiser from a sharded checkpoint's dcp/, resharded to this run's processes
    (any number, FSDP2, DDP or one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(wrapped, optimizer)      # the layout to read into
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(wrapped, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def list_checkpoints(root):
    if not os.path.isdir(root):
        return []
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step-\d{6}", d))
    return [os.path.join(root, d) for d in steps]


def load_training_state(path, wrapped, optimizer, compute):
    """Restore optimiser, RNG and return (step, this rank's loader state, trainer_state). The
    model weights were loaded from `path` before wrapping (see run_stage), except from a sharded
    checkpoint, whose model is restored here too. Either kind resumes with any number of
    processes (rank_loader_state: exactly where the ranks stood at a common boundary)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    with open(os.path.join(path, "trainer_state.json")) as f:
        ts = json.load(f)
    old, r = ts["world_size"], compute.rank
    if is_sharded_checkpoint(path):
        load_sharded_state(path, wrapped, optimizer, ts)
    else:                       # the full optimiser state, which every rank reads (and shards)
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        state = {}
        for key, v in tensors.items():
            name, k = key.rsplit("::", 1)
            state.setdefault(name, {})[k] = v
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in ts["param_groups"]]
        set_optimizer_state_dict(wrapped, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
    loader = rank_loader_state(ts["loader"], r, compute.world_size)
    # a rank that the checkpoint did not have takes the generators of rank r mod (its ranks)
    rng = load_file(os.path.join(path, "rng.safetensors"))
    src = r % old
    py, npy = ts["python_rng"][src], ts["numpy_rng"][src]
    s = {"torch": rng[f"rank{src}.torch"], "python": (py[0], tuple(py[1]), py[2]),
         "numpy": (npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:])}
    if f"rank{src}.cuda" in rng:
        s["cuda"] = rng[f"rank{src}.cuda"]
    set_rng_state(s, compute)
    return ts["step"], loader, ts


# -----------------------------------------------------------------------------
# 5. The run folder: nothing deleted without a flag, resume from the newest intact checkpoint

def prepare_run_dir(out, resume, overwrite, outputs, compute=None):
    """Make `out` and check it before a run writes there. `outputs` are the paths (relative to
    `out`) this run writes or replaces. If some already exist: --resume continues them, --overwrite
    deletes them (rank 0) to start again, and neither is a one-line error (exit 2) that names the
    folder and both choices; nothing is deleted without the flag. Returns the existing outputs."""
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other: --resume continues the run in "
             f"{out}, --overwrite deletes it and starts again")
    os.makedirs(out, exist_ok=True)
    existing = [p for p in outputs if os.path.exists(os.path.join(out, p))]
    if existing and not resume and not overwrite:
        fail(f"{out} already holds this run's output ({', '.join(existing)}): pass --resume to "
             "continue it, or --overwrite to delete it and start again")
    if existing and overwrite and (compute is None or compute.master):
        for p in existing:
            path = os.path.join(out, p)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if compute is not None:
        compute.barrier()
    return existing


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # someone else's live process
        return True
    return True


def clean_stale_tmp(root, log=print):
    """Remove the `NAME.tmp-PID` folders (and files) that a killed atomic write left in `root`,
    unless process PID still runs. A `NAME.old-PID` folder means the writer died between commit_dir's two
    renames: it holds the previous version, which goes back under NAME if NAME is missing."""
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        m = re.fullmatch(r"(.+)\.(tmp|old)-(\d+)", name)
        if not m or (int(m[3]) != os.getpid() and _pid_alive(int(m[3]))):
            continue
        path, final = os.path.join(root, name), os.path.join(root, m[1])
        if m[2] == "old" and not os.path.exists(final):
            os.rename(path, final)
            log(f"restored {final} from {name}, left by a write that was killed")
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
        log(f"removed {path}, left by a write that was killed (process {m[3]} has ended)")
    return removed


def _safetensors_problem(path):
    """None if the file's header parses and its tensors end exactly at the end of the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"header of {n} bytes in a file of {size}"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"truncated or padded: tensors end at byte {8 + n + max(ends, default=0)}, the file has {size}"
    return None


def checkpoint_problem(path, required=()):
    """Why the checkpoint folder `path` (written by save_training_state) cannot be resumed from,
    or None if it is intact: every file present (`required` adds some, e.g. extra.safetensors;
    a sharded checkpoint needs COMPLETE, its last file, and dcp/), every JSON file parses, every
    safetensors header is readable and matches its file size, and trainer_state.json agrees
    with the folder name and holds every rank's state."""
    if is_sharded_checkpoint(path):          # the model, heads and optimiser are all in dcp/
        files = [COMPLETE, "config.json", "trainer_state.json", "rng.safetensors", "dcp/.metadata"]
    else:
        files = ["config.json", "trainer_state.json", "optimizer.safetensors", "rng.safetensors", *required]
        if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
            files.append("model.safetensors")
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".json"):
            try:
                with open(full) as f:
                    json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return f"{name} is not valid JSON ({e})"
        elif name.endswith(".safetensors"):
            problem = _safetensors_problem(full)
            if problem:
                return f"{name}: {problem}"
    with open(os.path.join(path, "trainer_state.json")) as f:
        ts = json.load(f)
    keys = ("step", "world_size", "loader", "python_rng", "numpy_rng")
    if not isinstance(ts, dict) or not all(k in ts for k in keys) or \
            not (is_sharded_checkpoint(path) or "param_groups" in ts):
        return "trainer_state.json lacks step, world_size, param_groups, loader or the RNG states"
    m = re.search(r"step-(\d+)$", os.path.normpath(path))
    if m and ts["step"] != int(m[1]):
        return f"trainer_state.json says step {ts['step']}, the folder step {int(m[1])}"
    n = ts["world_size"]
    if not (isinstance(n, int) and n >= 1 and len(ts["loader"]) == len(ts["python_rng"]) ==
            len(ts["numpy_rng"]) == n):
        return f"trainer_state.json does not hold the state of each of its {n} rank(s)"
    return None


def resume_checkpoint(root, required=(), log=print, compute=None):
    """The newest intact checkpoint under `root` (None if there is none), after removing stale
    temporary folders; every newer damaged one is named with what is wrong with it (and kept,
    for inspection: the next save of that step replaces it). Under torchrun pass `compute`:
    rank 0 checks and cleans, and every rank gets its choice."""
    found = None
    if compute is None or compute.master:
        clean_stale_tmp(root, log)
        for path in reversed(list_checkpoints(root)):
            problem = checkpoint_problem(path, required)
            if problem is None:
                found = path
                break
            log(f"skipping checkpoint {path}: {problem}")
    return found if compute is None else gather_objects(found, compute)[0]


class JsonlLog:
    """An append-only JSONL log (metrics.jsonl, eval.jsonl): one JSON record per line, written
    by rank 0. A line cut by a crash is skipped when read and dropped by `keep_only`."""

    def __init__(self, path, compute=None):
        self.path, self.master = path, compute is None or compute.master

    def write(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self):
        if not os.path.isfile(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def keep_only(self, keep):
        """Rewrite the log (atomically) with the records for which keep(record) is true, e.g. to
        drop the steps after the checkpoint a run resumes from, which it will log again."""
        if not self.master or not os.path.isfile(self.path):
            return
        kept = [r for r in self.records() if keep(r)]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
