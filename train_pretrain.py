"""
train_pretrain.py — MiMo-VL's four pre-training stages (MiMo-VL report, arXiv 2506.03569, §2.1-2.3
and Table 1), runnable from a 2-core laptop to many GPUs with plain PyTorch and torch.distributed.

    # the small-scale reproduction: stage 0 + stages 1-4 on the tiny preset, 2 CPU cores (17 min)
    python train_pretrain.py
    # one GPU: a 2x wider model trained 4x longer (--scale trades time for quality)
    python train_pretrain.py --device cuda --scale 4 --out runs/pretrain-s4
    # 8 GPUs on one node (DDP for small models; --fsdp shards every block with FSDP2)
    torchrun --standalone --nproc_per_node 8 train_pretrain.py --scale 16 --out runs/pretrain-s16
    torchrun --standalone --nproc_per_node 8 train_pretrain.py --init path/to/Qwen2.5-VL-7B-Instruct \\
        --recipe paper --fsdp --grad-checkpointing --stage 1 --steps 2000 --stage-data-file my_data.json
    # real data: JSONL files (format: packing.py) and synthetic tasks mixed by weight, per stage
    python train_pretrain.py --stage 3 --from runs/pretrain/stage2 --stage-data 3=data/example.jsonl:0.3,count:1
    # several nodes (run on every node, NODE = 0..N-1; the data are read per rank, shared disk for --out)
    torchrun --nnodes 4 --node_rank $NODE --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER_HOST:29500 train_pretrain.py --init ... --recipe paper --fsdp
    # continue an interrupted run where it stopped / start a finished one again
    python train_pretrain.py --resume
    python train_pretrain.py --overwrite
    # the reasoning-data ablation: stage 4 again from the same stage-3 model, answers without CoT
    python train_pretrain.py --stage 4 --from runs/pretrain/stage3 --no-reasoning-data --out runs/pretrain-noreason
    # score a stage folder on the held-out suite or on any JSONL file: evaluate.py
    python evaluate.py runs/pretrain/stage4 --jsonl my_benchmark.jsonl

The recipe (MiMo-VL report Table 1): a pretrained ViT (Qwen2.5-ViT) and a pretrained LM
(MiMo-7B-Base) joined by a freshly initialised MLP projector (`model.visual.merger`), then

    stage 1  projector warm-up            projector only       image-caption pairs      LR 1e-3
    stage 2  vision-language alignment    ViT + projector      + interleaved data       LR 1e-4 -> 1e-5
    stage 3  general multimodal           everything           + OCR, grounding, video,  LR 1e-5
                                                                 counting, reasoning
    stage 4  long-context SFT             everything           + long/high-res data,     LR 2.5e-5
                                                                 much more long reasoning

each stage starting from the previous stage's output. `--init-vit DIR --init-lm DIR` is the
paper's start point (MiMoVL.from_towers: the ViT of a Qwen2.5-VL folder, the LM of a Qwen2/MiMo text
folder, a fresh projector); `--init DIR` takes both towers from one Qwen2.5-VL-format checkpoint and
re-initialises the projector. From scratch
there are no pretrained towers, so a stage 0 makes tiny ones first: `0-lm` trains the LM on the
synthetic text corpus, `0-vit` trains the ViT to classify every 28-px cell of synthetic scenes
through a small temporary head (measured: with random towers a projector-only stage 1 learns
colour but not shape). The tiny values in STAGES below are ours, chosen so that each stage
learns within minutes on a CPU; PAPER_STAGES are the paper's. Every stage trains on the synthetic
world's mixture for it unless --mixture (stages 1-4), --stage-data-file or --stage-data give it
JSONL files and synthetic tasks by weight (printed at start).

Output (`--out`, default runs/pretrain; a rerun needs --resume or --overwrite): tokenizer/ (the
from-scratch BPE), stage0-lm/ stage0-vit/ stage1/ .. stage4/ (Hugging Face folders that
MiMoVL.from_pretrained and transformers' Qwen2_5_VLForConditionalGeneration load),
checkpoints/<stage>/step-NNNNNN/ (resumable training state), metrics.jsonl, eval.jsonl, summary.md.

Sections: 1 the stage table · 2 the model's initialisation · 3 the training loop · 4 evaluation
after each stage · 5 command line. What each stage optimises (its objective: trainee, data stream,
step, evaluation) is in objectives.py; the mechanics both training scripts share (compute,
wrapping, optimiser, checkpoints, run folder) are in training.py.
"""

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

import packing
import synthetic
from evaluate import stages_table
from mimovl import MiMoVL, MiMoVLConfig, tiny_config, towers_plan
from objectives import OBJECTIVES
from processor import Processor
from training import (Compute, JsonlLog, atomic_dir,
                      build_optimizer, clean_stale_tmp, commit_dir, compute_init, fail, full_state,
                      is_sharded, is_sharded_checkpoint, list_checkpoints, load_training_state, lr_at,
                      format_memory, memory_estimate_gib, meta_model, prepare_run_dir, resume_checkpoint,
                      save_stage_folder, save_stage_streamed,
                      save_training_state, set_threads, set_trainable, wrap_model)


# -----------------------------------------------------------------------------
# 1. The stage table (MiMo-VL report Table 1)

@dataclass
class Stage:
    key: str            # "0-lm", "0-vit", "1" .. "4"
    purpose: str
    trainable: tuple    # parts of the model (training.PARTS) that get gradients
    lr: float           # peak learning rate, reached after `warmup` steps
    min_lr: float       # the cosine decay ends here
    warmup: int         # optimiser steps of linear warm-up
    steps: int          # optimiser steps
    seq_len: int        # tokens per packed row (the paper's sequence length)
    rows: int           # packed rows per optimiser step, all ranks together (0-vit: images)
    data: str           # what the stage trains on (the mixtures live in synthetic.STAGE_MIXTURES)
    paper: str          # the paper's setting for this stage


# Tiny-scale values. Learning rates, measured in this project on the 4 M-parameter model: 3e-4
# got it off the no-image plateau (the loss the text alone allows) where 1e-3 kept it there;
# the projector-only stage keeps the paper's 1e-3, since a small randomly initialised MLP
# between two frozen towers tolerates it. Stage 4 doubles the row length (long-context
# packing) and, as the paper, raises the LR above stage 3's.
STAGES = {
    "0-lm": Stage("0-lm", "LM pre-training (stands in for MiMo-7B-Base)", ("llm",),
                  1e-3, 1e-4, 20, 400, 2048, 1, "synthetic text: documents, text scenes, word problems",
                  "none: MiMo-7B-Base is pretrained"),
    "0-vit": Stage("0-vit", "ViT pre-training (stands in for Qwen2.5-ViT)", ("vit", "projector"),
                   1e-3, 1e-4, 20, 150, 0, 32, "synthetic scenes, the class of every 28-px cell",
                   "none: Qwen2.5-ViT is pretrained"),
    "1": Stage("1", "projector warm-up", ("projector",),
               1e-3, 1e-4, 20, 150, 2048, 1, "captions", "projector only, LR 1e-3, 300 B tokens, 8K"),
    "2": Stage("2", "vision-language alignment", ("vit", "projector"),
               3e-4, 3e-5, 20, 150, 2048, 1, "+ interleaved", "ViT + projector, LR 1e-4 -> 1e-5, 167 B, 8K"),
    "3": Stage("3", "general multimodal pre-training", ("vit", "projector", "llm"),
               3e-4, 3e-5, 30, 800, 2048, 1, "+ OCR, grounding, counting, video, reasoning, text",
               "all, LR 1e-5, 1.4 T, 8K"),
    "4": Stage("4", "long-context SFT", ("vit", "projector", "llm"),
               4e-4, 4e-5, 20, 250, 4096, 1, "+ long and high-res data, more long reasoning",
               "all, LR 2.5e-5, 550 B, 32K"),
}

# The paper's values for a 7B model started with --init (steps: tokens / (rows x seq_len) at a
# global batch of 2 M tokens; in practice set --steps for the budget you have).
PAPER_STAGES = {
    "1": replace(STAGES["1"], lr=1e-3, min_lr=1e-3, warmup=1000, steps=143_000, seq_len=8192, rows=256),
    "2": replace(STAGES["2"], lr=1e-4, min_lr=1e-5, warmup=1000, steps=80_000, seq_len=8192, rows=256),
    "3": replace(STAGES["3"], lr=1e-5, min_lr=1e-5, warmup=1000, steps=668_000, seq_len=8192, rows=256),
    "4": replace(STAGES["4"], lr=2.5e-5, min_lr=2.5e-5, warmup=1000, steps=262_000, seq_len=32768, rows=64),
}
STAGE_ORDER = ("0-lm", "0-vit", "1", "2", "3", "4")


def stage_table(stages):
    lines = ["stage  trainable            lr       -> min_lr   warmup  steps  seq_len  rows  data",
             "-----  -------------------  --------------------  ------  -----  -------  ----  ----"]
    for s in stages:
        lines.append(f"{s.key:<6} {'+'.join(s.trainable):<20} {s.lr:<8.2g} -> {s.min_lr:<8.2g}  "
                     f"{s.warmup:>6}  {s.steps:>5}  {s.seq_len:>7}  {s.rows:>4}  {s.data}")
    return "\n".join(lines)


DATA_STAGES = ("0-lm", "1", "2", "3", "4")      # the stages that train on a mixture (not 0-vit)


def stage_mixture(key, args, data):
    """The data of a stage: its entry of `data` (stage_data: JSONL files and synthetic tasks
    from the command line) or else synthetic.stage_mixture (each stage adds data types, MiMo-VL
    report §2.2), plus --replay of the earlier stages' data (1..k-1, equal shares). Measured:
    without replay stage 3 erased stage 1's big-shape captions (accuracy 0.81 -> 0.00)."""
    if key == "0-lm":
        return data.get(key) or synthetic.stage_mixture(0)
    k, reasoning = int(key), not args.no_reasoning_data
    mix = data.get(key) or synthetic.stage_mixture(k, reasoning)
    earlier = [data.get(str(j)) or synthetic.stage_mixture(j, reasoning) for j in range(1, k)]
    if not earlier or args.replay <= 0:
        return mix

    def scaled(items, share):
        total = sum(m.weight for m in items)
        return [replace(m, weight=m.weight / total * share) for m in items]
    return scaled(mix, 1 - args.replay) + sum((scaled(e, args.replay / len(earlier)) for e in earlier), [])


def stage_data(args):
    """{stage key: mixture} of the stages the command line gives data (the others train on the
    synthetic default). Per stage, --stage-data wins over --stage-data-file (paths relative to
    that file), which wins over --mixture (stages 1-4). Read at start-up: a bad entry is a
    one-line error naming the flag, before any model is built."""
    specs = {k: ("--mixture", args.mixture, None) for k in DATA_STAGES[1:] if args.mixture}
    path = args.stage_data_file
    if path:
        try:
            with open(path) as f:
                recipe = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--stage-data-file {path}: cannot read it as JSON ({e})")
        if not isinstance(recipe, dict) or not all(k in DATA_STAGES and isinstance(v, str)
                                                   for k, v in recipe.items()):
            fail(f"--stage-data-file {path}: write one JSON object of stage -> 'source:weight,...', "
                 f"stages among {', '.join(DATA_STAGES)}, e.g. {{\"3\": \"data/example.jsonl:0.3,count:1\"}}")
        base = os.path.dirname(os.path.abspath(path))
        specs.update({k: (f"--stage-data-file {path}", v, base) for k, v in recipe.items()})
    for entry in args.stage_data:
        key, sep, spec = entry.partition("=")
        if not sep or key.strip() not in DATA_STAGES:
            fail(f"--stage-data {entry!r}: write STAGE=source:weight,... with STAGE one of "
                 f"{', '.join(DATA_STAGES)}, e.g. 3=data/example.jsonl:0.3,count:1")
        specs[key.strip()] = ("--stage-data", spec, None)
    out = {}
    for key, (flag, spec, base) in specs.items():
        try:
            out[key] = packing.parse_mixture(spec, base)
        except ValueError as e:
            fail(f"{flag} (stage {key}): {e}")
    return out


def describe_mixture(mix):
    """'example.jsonl 27%, count 18%, ...': what a stage trains on, for the start-up printout."""
    total = sum(m.weight for m in mix)
    shares = {}
    for m in mix:
        name = os.path.relpath(m.path) if isinstance(m, packing.JsonlSource) else m.task
        shares[name] = shares.get(name, 0) + m.weight / total
    return ", ".join(f"{name} {share:.0%}" for name, share in shares.items())


# -----------------------------------------------------------------------------
# 2. The model: initialisation (freezing: training.set_trainable over training.PARTS)

def scratch_config(a, p):
    """A from-scratch model's architecture: the tiny preset (widened by --scale) or --preset, with
    the special-token ids of the from-scratch tokenizer (processor p): the mimo-vl-7b preset has
    the official tokenizer's 151643..., which the synthetic BPE does not have."""
    cfg = tiny_config(a.scale) if a.preset == "tiny" else MiMoVLConfig.preset(a.preset)
    return replace(cfg, image_token_id=p.image_token_id, video_token_id=p.video_token_id,
                   vision_start_token_id=p.vision_start_token_id,
                   vision_end_token_id=p.tokenizer.token_to_id("<|vision_end|>"),
                   bos_token_id=p.pad_token_id, eos_token_id=p.eos_token_id, pad_token_id=p.pad_token_id).validate()


def fresh_model(a, processor):
    """A from-scratch model (stage 0-lm's start), initialised identically on every rank."""
    cfg = scratch_config(a, processor)
    torch.manual_seed(a.seed)               # identical initial weights on every rank
    model = MiMoVL(cfg)
    with torch.no_grad():
        # std-0.02 patch embeddings drown the shapes in the background; measured in this
        # project, x5 made the tiny model learn counting images several times faster
        model.visual.patch_embed.proj.weight.mul_(a.patch_embed_scale)
    return model


# -----------------------------------------------------------------------------
# 3. The training loop

@dataclass
class Run:
    """What every stage of one invocation shares."""
    args: argparse.Namespace
    compute: Compute
    out: str
    stages: dict            # key -> Stage (after overrides)
    data: dict              # key -> the mixture the command line gives it (stage_data)

    def __post_init__(self):
        self.metrics = JsonlLog(os.path.join(self.out, "metrics.jsonl"), self.compute)
        self.evals = JsonlLog(os.path.join(self.out, "eval.jsonl"), self.compute)

    def stage_dir(self, key):
        return os.path.join(self.out, f"stage{key}")

    def ckpt_root(self, key):
        return os.path.join(self.out, "checkpoints", f"stage{key}")

    def mixture(self, key):
        """The data stage `key` trains on (stage_mixture)."""
        return stage_mixture(key, self.args, self.data)


def start_folder(run, key, first):
    """Where stage `key` starts: --from for the first stage of this invocation, else the previous
    stage's folder (stage 1: stage0-vit, or --init); None = a fresh model (stage 0-lm)."""
    a = run.args
    if first and a.from_dir:
        return a.from_dir
    if key == "0-lm":
        return None
    if key == "1" and (a.init or a.init_lm):
        return a.init or a.init_lm              # --init-lm: the tokenizer comes with the LM
    prev = STAGE_ORDER[STAGE_ORDER.index(key) - 1]
    path = run.stage_dir(prev)
    if not os.path.isfile(os.path.join(path, "config.json")):
        fail(f"stage {key} starts from stage {prev}'s output {path}, which does not exist: "
             f"run stage {prev} first, pass --from DIR, or --init DIR (stage 1)")
    return path


def load_processor(run, folder):
    """The tokenizer + chat template of `folder`, or (from scratch) the BPE trained on the
    synthetic corpus, made once by rank 0."""
    if folder is not None:
        return Processor.from_pretrained(folder)
    path = os.path.join(run.out, "tokenizer")
    if run.compute.master and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        tmp = atomic_dir(path)
        synthetic.train_tokenizer(tmp, vocab_size=run.args.vocab_size or 1024, seed=run.args.seed)
        commit_dir(tmp, path)
    run.compute.barrier()
    return Processor.from_pretrained(path)


def start_weights(run, key, src, resume_from):
    """Where the stage's starting weights come from: the checkpoint when resuming, else `src`, or
    for stage 1 from --init-vit + --init-lm the towers_plan's {parameter: (file, key)}."""
    a = run.args
    if key == "1" and not resume_from and a.init_lm and src == a.init_lm:
        return towers(a).sources
    return resume_from or src


def load_model(run, key, src, resume_from, processor):
    """The stage's starting model in fp32: its checkpoint when resuming, else `src` or (None) a
    fresh model; stage 1 starts with a fresh projector (MiMo-VL report §2.1)."""
    weights = start_weights(run, key, src, resume_from)
    if isinstance(weights, dict):
        plan = towers(run.args)
        run.compute.print(f"stage 1 starts from the ViT of {run.args.init_vit} and the LM of {run.args.init_lm} "
                          f"(dropped {len(plan.dropped)} model.mtp_layers.* tensors), a fresh projector")
    meta = run.args.fsdp and run.compute.distributed and bool(weights)
    if meta or (resume_from and is_sharded_checkpoint(resume_from)):
        # no rank builds the whole model: wrap_model fills each rank's shards from the folder,
        # or load_training_state from a sharded checkpoint
        if isinstance(weights, dict):
            with torch.device("meta"):
                model = MiMoVL(towers(run.args).config)
        else:
            model = meta_model(weights)
        if not meta:
            model.to_empty(device="cpu")
    elif isinstance(weights, dict):
        model = MiMoVL.from_towers(run.args.init_vit, run.args.init_lm, dtype=torch.float32, progress=False)
    elif resume_from or src:
        model = MiMoVL.from_pretrained(resume_from or src, dtype=torch.float32, progress=False)
    else:
        model = fresh_model(run.args, processor)
    if processor.tokenizer.get_vocab_size() > model.cfg.text.vocab_size:
        fail(f"the tokenizer has {processor.tokenizer.get_vocab_size()} tokens, more than "
             f"the model's vocab_size {model.cfg.text.vocab_size}")
    if key == "1" and not resume_from:
        # a fresh projector; on a meta model (FSDP2) it is made whole on every rank, as one
        # process makes it, then sliced by wrap_model
        torch.manual_seed(run.args.seed + 1)
        model.init_projector()
    return model


def run_stage(run, key, first):
    """Train one stage and write its HF folder (main() evaluates it). Returns the folder."""
    a, c = run.args, run.compute
    stage, final, ckpt_root = run.stages[key], run.stage_dir(key), run.ckpt_root(key)
    if a.resume and os.path.isfile(os.path.join(final, "pretrain_stage.json")):
        c.print(f"stage {key}: done earlier ({final}); skipping")
        return final
    set_threads(c, a.threads, f"stage {key}")
    per_rank = math.ceil(stage.rows / c.world_size)      # every rank takes part in every step
    if per_rank * c.world_size != stage.rows:
        c.print(f"stage {key}: --rows {stage.rows} rounded up to {per_rank * c.world_size} per step "
                f"(global batch), a multiple of the {c.world_size} processes")
    Objective = OBJECTIVES[key]
    resume_from = resume_checkpoint(ckpt_root, Objective.extra_files, c.print, c) if a.resume else None

    src = start_folder(run, key, first)
    processor = load_processor(run, resume_from or src)
    model = load_model(run, key, src, resume_from, processor)
    set_trainable(model, stage.trainable)
    model.visual.gradient_checkpointing = model.model.gradient_checkpointing = a.grad_checkpointing
    objective = Objective(run, key, model, processor, resume_from)
    if not any(p.is_meta for p in objective.trainee.parameters()):
        objective.trainee.to(c.device)
    objective.trainee.train()
    sharded_resume = resume_from and is_sharded_checkpoint(resume_from)
    wrapped = wrap_model(objective.trainee, c, a.fsdp,
                         weights=None if sharded_resume else start_weights(run, key, src, resume_from))
    if a.compile:
        # the dense part of every block; attention stays eager: its packed varlen loop has
        # data-dependent segment counts (and on GPU it is already one fused Triton kernel)
        for block in [*model.visual.blocks, *model.model.layers]:
            block.mlp.compile(dynamic=True)
    opt = build_optimizer(wrapped, stage.lr, a.weight_decay, (a.beta1, a.beta2), c.device)
    step, loader_state = 0, None
    if resume_from:
        step, loader_state, _ = load_training_state(resume_from, wrapped, opt, c)
        c.print(f"stage {key}: resuming from {resume_from} (step {step})")
    # this run logs the steps after `step` (again) and evaluates the stage anew
    run.metrics.keep_only(lambda r: r.get("stage") != key or r.get("step", 0) <= step)
    run.evals.keep_only(lambda r: r.get("stage") != key)
    n_train = sum(p.numel() for p in objective.trainee.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    c.print(f"\n=== stage {key}: {stage.purpose} — trains {'+'.join(stage.trainable)} "
            f"({n_train / 1e6:.2f} M of {n_total / 1e6:.2f} M parameters), from "
            f"{resume_from or src or 'scratch'}\n    {stage.steps} steps, lr {stage.lr:g} -> "
            f"{stage.min_lr:g}, warm-up {stage.warmup}; data: {stage.data}; paper: {stage.paper}")
    if c.device.type == "cuda" or a.fsdp:
        c.print("    estimated memory per GPU with FSDP2 + gradient checkpointing (training.memory_estimate_gib):\n" +
                format_memory(memory_estimate_gib(model.cfg, c.world_size, stage.seq_len, stage.trainable)))

    objective.start(per_rank, step, loader_state)
    train(run, key, objective, wrapped, opt, step, model.cfg, processor)

    record = {"stage": key, "steps": stage.steps, "stage_config": asdict(stage),
              "started_from": src, "args": vars(a)}
    dtype = None if a.save_dtype == "float32" else getattr(torch, a.save_dtype)
    if is_sharded(wrapped):         # streamed, one parameter at a time: no full state dict
        save_stage_streamed(final, wrapped, model.cfg, processor, record, c, dtype, objective.split)
    else:
        state = full_state(wrapped)
        if c.master:
            model_state, extra = objective.split(state)
            save_stage_folder(final, model_state, model.cfg, processor, record, dtype=dtype, extra=extra)
    c.barrier()
    c.print(f"stage {key}: wrote {final}")
    return final


def train(run, key, objective, wrapped, opt, step, cfg, processor):
    """Optimiser steps `step` .. stage.steps: schedule, forward/backward, the NaN guard, gradient
    clipping, the metrics log and the checkpoints."""
    from tqdm import tqdm
    a, c, stage = run.args, run.compute, run.stages[key]
    bar = tqdm(total=stage.steps, initial=step, desc=f"stage {key}", disable=not c.master,
               dynamic_ncols=True, mininterval=2, file=sys.stdout)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    t_last = time.perf_counter()
    try:
        while step < stage.steps:
            batch = objective.next_batch()
            lr = lr_at(step, stage.lr, stage.min_lr, stage.warmup, stage.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, extra = objective.forward_backward(wrapped, batch)
            if step == a.debug_nan_at_step:          # as a diverging run would (tests the guard)
                loss = float("nan")
            if not math.isfinite(loss):
                raise diverged(run, key, f"the loss is {loss} at step {step + 1}")
            norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
            if hasattr(norm, "full_tensor"):          # FSDP2: a sharded DTensor
                norm = norm.full_tensor()
            if not math.isfinite(float(norm)):
                raise diverged(run, key, f"the gradient norm is {float(norm)} at step {step + 1}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            tok_s = extra.get("tokens", 0) / max(now - t_last, 1e-9)
            t_last = now
            run.metrics.write({"stage": key, "step": step, "loss": loss, "lr": lr, "grad_norm": float(norm),
                               **extra, "tok_per_s": round(tok_s, 1), "time": time.time()})
            bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.1e}" + objective.progress(extra, tok_s), refresh=False)
            bar.update(1)
            if a.save_every and step % a.save_every == 0 and step < stage.steps:
                save_training_state(run.ckpt_root(key), step, wrapped, opt, cfg, processor,
                                    objective.loader_state(step), c, a.keep_last, {"stage": key},
                                    split=objective.split)
            if a.debug_stop_after and step == a.debug_stop_after:
                c.print(f"stopping after step {step} (--debug-stop-after)")
                raise SystemExit(3)
    finally:
        bar.close()


def diverged(run, key, what):
    """The NaN guard's exit: the optimiser step was not taken, so the checkpoints are good."""
    last = (list_checkpoints(run.ckpt_root(key)) or ["none (the stage had not saved one yet)"])[-1]
    return SystemExit(f"\nERROR: stage {key}: {what}. Training stopped before the optimiser step, so no "
                      f"bad weights were written. Last good checkpoint: {last}. Lower the learning rate "
                      "(--lr) or raise --warmup, then rerun (with --resume to continue from that checkpoint).")


# -----------------------------------------------------------------------------
# 4. Evaluation after each stage (evaluate.py: the held-out suite, baselines, tables)

def evaluate_stage(run, key, folder, cache):
    """After stage `key`: stage 0 measures its towers (held-out text loss, cell accuracy); stages
    1-4 run the held-out suite (model, majority answer, blank image). Printed and logged."""
    c = run.compute
    set_threads(c, run.args.threads, f"stage {key} evaluation")
    model = MiMoVL.from_pretrained(folder, dtype=c.eval_dtype, device=c.device, progress=False).eval()
    processor = Processor.from_pretrained(folder)
    t0 = time.perf_counter()
    res, text = OBJECTIVES[key].evaluate(run, key, model, processor, folder, cache)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    c.print(text + f"\n(evaluation took {res['eval_seconds']} s)")
    run.evals.write({"stage": key, "folder": folder, **{k: v for k, v in res.items() if k != "examples"},
                     "examples": res.get("examples")})
    return res


# -----------------------------------------------------------------------------
# 5. Command line

def parse_stage_values(text, kind, stage_keys, flag):
    """'3e-4' (every selected stage) or '1:1e-3,3:2e-4' (per stage) -> {stage key: value}."""
    if text is None:
        return {}
    out = {}
    for part in text.split(","):
        k, v = part.split(":", 1) if ":" in part else (None, part)
        if k is not None and k not in STAGE_ORDER:
            fail(f"{flag} {text!r}: unknown stage {k!r}; stages are {', '.join(STAGE_ORDER)}")
        try:
            value = kind(v)
        except ValueError:
            fail(f"{flag} {text!r}: cannot read {v!r}; give 'V' or 'STAGE:V,STAGE:V'")
        out.update({k: value} if k else {s: value for s in stage_keys})
    return out


def selected_stages(text, init):
    if text == "all":
        keys = list(STAGE_ORDER[2:] if init else STAGE_ORDER)
    else:
        keys = []
        for part in text.split(","):
            part = part.strip()
            if part not in ("0", *STAGE_ORDER):
                fail(f"--stage {text!r}: use all, 0, 0-lm, 0-vit, 1, 2, 3, 4 or a comma list")
            keys += ["0-lm", "0-vit"] if part == "0" else [part]
    if init and any(k.startswith("0") for k in keys):
        fail("--init / --init-lm give pretrained towers: stage 0 (tower pre-training from scratch) "
             "does not apply; run stages 1-4")
    return sorted(set(keys), key=STAGE_ORDER.index)


def build_parser():
    p = argparse.ArgumentParser(description="MiMo-VL pre-training, stages 0-4 (MiMo-VL report Table 1)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", default="all", help="all, 0 (= 0-lm,0-vit), 0-lm, 0-vit, 1, 2, 3, 4, or a comma list")
    g.add_argument("--out", default="runs/pretrain", help="output folder (stage folders, checkpoints, logs)")
    g.add_argument("--resume", action="store_true",
                   help="skip finished stages and continue the current one from its newest intact checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the selected stages' folders and checkpoints in --out and train them again")
    g.add_argument("--from", dest="from_dir", default=None,
                   help="start the first selected stage from this HF folder instead of the previous stage's output")
    g.add_argument("--init", default=None,
                   help="a Qwen2.5-VL-format checkpoint: ViT and LM from there, projector re-initialised; "
                        "skips stage 0")
    g.add_argument("--init-vit", default=None,
                   help="the paper's start point, with --init-lm: the ViT from this Qwen2.5-VL-format folder")
    g.add_argument("--init-lm", default=None,
                   help="with --init-vit: the LM (and tokenizer) from this Qwen2/MiMo text or Qwen2.5-VL folder "
                        "(MiMo-7B-Base's mtp_layers are dropped); the projector is fresh; skips stage 0")

    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=MiMoVLConfig.PRESETS, help="architecture of a from-scratch model")
    g.add_argument("--scale", type=float, default=1,
                   help="quality knob: multiplies every stage's steps and (>= 3) widens the tiny model by round(sqrt(scale))")
    g.add_argument("--patch-embed-scale", type=float, default=5.0,
                   help="multiply the from-scratch patch-embedding init by this (see fresh_model)")
    g.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary bound for a from-scratch tokenizer")

    g = p.add_argument_group("stage table overrides ('V' for every selected stage, or 'STAGE:V,STAGE:V')")
    g.add_argument("--recipe", default="auto", choices=("auto", "tiny", "paper"),
                   help="stage table: tiny (this file's STAGES) or paper (PAPER_STAGES, for --init with a 7B model); "
                        "auto = paper when --init has an LM of hidden size >= 2048")
    g.add_argument("--lr", default=None, help="peak learning rate")
    g.add_argument("--min-lr", default=None, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup", default=None, help="warm-up steps")
    g.add_argument("--steps", default=None, help="optimiser steps")
    g.add_argument("--seq-len", default=None, help="tokens per packed row")
    g.add_argument("--rows", default=None, help="packed rows per optimiser step over all ranks (0-vit: images); "
                                               "rows / world_size per rank = gradient accumulation")
    g.add_argument("--trainable", default=None, help="parts to train, '+'-joined: vit, projector, llm")

    g = p.add_argument_group("data (default: the synthetic world's stage mixtures; sources are synthetic "
                             "task names or JSONL files, 'source:weight,...')")
    g.add_argument("--mixture", default=None,
                   help="the data of stages 1-4, e.g. 'data/example.jsonl:0.3,count:1'")
    g.add_argument("--stage-data", action="append", default=[], metavar="STAGE=MIXTURE",
                   help="the data of one stage (0-lm, 1-4), e.g. 3=data/example.jsonl:0.3,count:1; repeatable")
    g.add_argument("--stage-data-file", default=None,
                   help='a JSON file {"3": "ocr.jsonl:0.3,count:1", ...}; paths relative to the file')
    g.add_argument("--replay", type=float, default=0.1,
                   help="fraction of each stage's data drawn from the earlier stages' mixtures (stages 2-4)")
    g.add_argument("--no-reasoning-data", action="store_true",
                   help="ablation: the arithmetic tasks without their chains of thought (answers only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--seed", type=int, default=0, help="model init, data and tokenizer seed")

    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--precision", default="auto", help="bf16 (autocast), fp32, or auto (bf16 where native)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 per block instead of DDP")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile every ViT block and LM layer")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: chosen per stage, the cores not kept busy by other processes)")
    g.add_argument("--workers", type=int, default=1, help="data-loader worker processes per rank")
    g.add_argument("--chunk-size", type=int, default=256, help="samples packed together per data chunk")

    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--save-every", type=int, default=100, help="save resumable training state every N steps (0: never)")
    g.add_argument("--keep-last", type=int, default=2, help="training-state checkpoints kept per stage")
    g.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the stage folders")
    g.add_argument("--eval-n", type=int, default=64, help="held-out items per task in the evaluation")
    g.add_argument("--eval-batch", type=int, default=64, help="prompts per generation batch")
    g.add_argument("--eval-tasks", default=None,
                   help="comma list of suite tasks to evaluate (default: all of EVAL_SUITE and LOSS_SUITE)")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after each stage")

    g = p.add_argument_group("debugging (used by the tests)")
    g.add_argument("--debug-stop-after", type=int, default=0, help="exit with code 3 after this step (simulates a crash)")
    g.add_argument("--debug-nan-at-step", type=int, default=-1, help="make the loss NaN at this step (0-based)")
    return p


@functools.lru_cache(maxsize=None)
def plan_towers(vit_dir, lm_dir):
    return towers_plan(vit_dir, lm_dir)


def towers(args):
    """The towers_plan of --init-vit / --init-lm (None without them): every config, tokenizer and
    weight-header check of MiMoVL.from_towers, made before any work starts."""
    if not (args.init_vit or args.init_lm):
        return None
    if not (args.init_vit and args.init_lm) or args.init:
        fail("give --init-vit and --init-lm together (the paper's ViT + LM start), or --init alone")
    try:
        return plan_towers(args.init_vit, args.init_lm)
    except (OSError, ValueError) as e:
        fail(f"--init-vit / --init-lm: {e}")


def resolve_stages(args, keys):
    """The stage table after --recipe, --scale and the per-field overrides."""
    if args.init and not os.path.isfile(os.path.join(args.init, "config.json")):
        fail(f"--init {args.init}: no config.json there; give a Qwen2.5-VL-format checkpoint folder")
    if args.recipe == "auto":
        args.recipe = "tiny"
        if args.init:
            with open(os.path.join(args.init, "config.json")) as f:
                big = MiMoVLConfig.from_hf_dict(json.load(f)).text.hidden_size >= 2048
            args.recipe = "paper" if big else "tiny"
        if args.init_lm:
            args.recipe = "paper" if towers(args).config.text.hidden_size >= 2048 else "tiny"
    table = {**STAGES, **(PAPER_STAGES if args.recipe == "paper" else {})}
    out = {k: table[k] for k in STAGE_ORDER}
    if args.scale != 1:
        out = {k: replace(s, steps=max(1, round(s.steps * args.scale))) for k, s in out.items()}
    fields = {"lr": float, "min_lr": float, "warmup": int, "steps": int, "seq_len": int, "rows": int,
              "trainable": lambda v: tuple(x for x in v.split("+") if x)}
    for name, kind in fields.items():
        flag = "--" + name.replace("_", "-")
        for k, v in parse_stage_values(getattr(args, name), kind, keys, flag).items():
            if name in ("steps", "seq_len", "rows") and v < 1:
                fail(f"{flag}: {v} for stage {k}; give a positive number")
            out[k] = replace(out[k], **{name: v})
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    data = stage_data(args)
    towers(args)                            # --init-vit / --init-lm: checked before any work
    compute = compute_init(args.device, args.precision)
    t_start = time.perf_counter()
    keys = selected_stages(args.stage, args.init or args.init_lm)
    run = Run(args, compute, args.out, resolve_stages(args, keys), data)
    for k, mix in data.items():     # the table's data column: what the command line gave
        run.stages[k] = replace(run.stages[k], data=describe_mixture(mix))
    outputs = [p for k in keys for p in (f"stage{k}", os.path.join("checkpoints", f"stage{k}"))]
    if "0-lm" in keys and not args.from_dir:
        outputs.append("tokenizer")              # the from-scratch tokenizer, made by stage 0-lm
    src = os.path.abspath(args.from_dir or "/")
    if args.overwrite and any(os.path.commonpath([src, os.path.abspath(os.path.join(args.out, p))]) ==
                              os.path.abspath(os.path.join(args.out, p)) for p in outputs):
        fail(f"--overwrite would delete --from {args.from_dir}: copy it elsewhere or choose another --out")
    prepare_run_dir(args.out, args.resume, args.overwrite, outputs, compute)
    if compute.master:
        clean_stale_tmp(args.out, compute.print)
    compute.print(f"stages to run ({args.recipe} table):\n" + stage_table([run.stages[k] for k in keys]))
    compute.print("what each stage trains on (shares of the samples, replay included):\n" + "\n".join(
        f"  {k:<6} {describe_mixture(stage_mixture(k, args, data)) if k in DATA_STAGES else run.stages[k].data}"
        for k in keys))

    results, suite_cache = {}, {}
    for i, key in enumerate(keys):
        folder = run_stage(run, key, first=(i == 0))
        if args.no_eval:
            continue
        logged = [r for r in run.evals.records() if r.get("stage") == key] if args.resume else []
        results[key] = logged[-1] if logged else evaluate_stage(run, key, folder, suite_cache)
    table = None if args.no_eval else stages_table(results)
    if table and compute.master:
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table + "\n")
    if table:
        compute.print("\nheld-out results after each stage (greedy; majority = always the most "
                      "frequent answer; blank image = the final model given black images):\n" + table)
    compute.print(f"\ntotal time {(time.perf_counter() - t_start) / 60:.1f} min; outputs in {args.out}")
    if compute.distributed:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
