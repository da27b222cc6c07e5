"""
train_rl.py — MORL, Mixed On-policy Reinforcement Learning: the RL stage of MiMo-VL (MiMo-VL
technical report, arXiv 2506.03569, §3), at small scale on the synthetic tasks of synthetic.py.

    python train_rl.py --train-rm          # Bradley-Terry reward model -> runs/rl/reward_model
    python train_rl.py                     # MORL from runs/pretrain/stage4 -> runs/rl/final
    python train_rl.py --resume            # continue from the newest intact checkpoint in runs/rl
    python train_rl.py --debug --steps 3   # print a few rollouts with their rewards
    python train_rl.py --compare           # on-policy vs vanilla GRPO on text math (report Fig. 7)
    python train_rl.py --algo grpo --updates-per-batch 4 --kl-beta 0.01    # vanilla GRPO + KL
    python train_rl.py --all               # the whole reproduction: pre-training, reward model,
                                           # MORL, tables and a chat answer, one progress bar
    python train_rl.py --device cuda --sft runs/pretrain-s4/stage4 --steps 200        # one GPU
    torchrun --standalone --nproc_per_node 8 train_rl.py --sft DIR --prompts-per-step 64   # DDP
    torchrun --standalone --nproc_per_node 8 train_rl.py --recipe paper --sft DIR \
        --rm RM_DIR --rm-device "cuda:{local_rank}"     # 7B: FSDP2 policy, the report's scale

One run turns the SFT model (pre-training stage 4) into the RL model by optimising, jointly,
verifiable rewards (math answers, counts, boxes, points, OCR, temporal spans) and the score of a
Bradley-Terry reward model on open-ended answers. Rewards live in rewards.py, each in [0, 1];
there is no format reward.

The update, "a fully on-policy variant of GRPO" (report eq. 1-2; GRPO: DeepSeekMath,
arXiv 2402.03300), the default `--algo onpolicy`:

    for each prompt q, sample G responses o_1..o_G from the current policy pi_theta
    r_i = reward router(task of q, o_i, ground truth of q)                           in [0, 1]
    A_i = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)       sample std (G - 1), as verl and TRL
    L   = -(1 / n_groups) sum_groups (1 / sum_i |o_i|) sum_i sum_t A_i log pi_theta(o_i,t | q, o_i,<t)

  * the normaliser as eq. 1 writes it: each group's tokens are averaged over the group's own
    response tokens, then groups are averaged (`--loss-norm group`). `--loss-norm token-mean`
    averages over every response token of the (mini-)batch instead, as verl's loss_agg_mode
    "token-mean" implements DAPO's token-level loss (arXiv 2503.14476, §3.3), so groups with
    longer responses weigh more;
  * exactly ONE optimiser step per rollout batch: the policy that is updated is the policy that
    sampled, so the ratio pi_theta / pi_old is exactly 1 and no clipping is needed; the loss is
    the formula itself, -A log pi (the clipped surrogate at ratio 1 has the same gradient: tested);
  * rollouts sample from pi_theta itself: temperature 1, no top-p truncation. The update's
    log-probs are those of the full, untempered softmax; a sample drawn at another temperature or
    from a truncated distribution would come from another policy, the ratio would not be 1 and
    the gradient would be biased (so would vanilla GRPO's pi_old). `--temperature` and `--top-p`
    other than 1 are therefore refused with an error rather than silently mis-weighted;
  * no KL term and no reference model.

`--algo grpo` is vanilla GRPO, for the report's comparison (Fig. 7): several optimiser steps per
rollout batch (--updates-per-batch, default 4), so from the second on the data is off-policy; it
uses the clipped surrogate min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = pi_theta /
pi_old, with DAPO's asymmetric "clip-higher" bounds (0.2 / 0.28) and optionally a k3 KL penalty to
the frozen SFT model (--kl-beta). Both modes share the normaliser, so the comparison isolates the
update rule. From MiMo-7B's RL recipe (arXiv 2505.07608, §3.3): dynamic sampling (groups whose
rewards are all equal carry no gradient: dropped, the batch refilled) and the easy pool (prompts
every sample of which passes leave the stream and come back with probability 0.1).

Outputs (--out, default runs/rl): final/ (the RL model, a Hugging Face folder:
`python chat.py --model runs/rl/final`), reward_model/, checkpoints/step-N/, metrics.jsonl,
eval.jsonl (--eval-every), eval_sft.json, summary.md (the before/after table), progress.json.
An existing run is never deleted: pass --resume to continue it or --overwrite to start again.
At 7B (--fsdp, part of --recipe paper) the policy is FSDP2-sharded; each rollout samples from a
full bf16 copy of the current weights gathered for it and freed after (rollout_weights), and the
reward model may run in a process of its own (--rm-device, reward_model.RewardModelServer).
Where the rest lives: rollouts.py (the prompt stream, dynamic sampling, the easy pool, G responses
per prompt from one prefill), rewards.py (every reward, the reward pool), reward_model.py (the
Bradley-Terry reward model), evaluate.py (held-out rewards, the before/after table), main_job.py
(--all). Tests: tests/test_grpo.py (advantages, normalisers, losses by hand), tests/test_rl.py (the
loop through a tiny model: loss by hand, ratio 1, learning, reward model, resume, torchrun),
tests/test_rl_fsdp.py (2 FSDP2 processes = 1 process, sharded resume, --recipe paper).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import packing
import reward_model
import synthetic
import train_pretrain
import training
from checkpoint_files import write_json_atomic
from evaluate import evaluate_rewards, mean_reward, results_table, rl_tag_of, summarise_rewards
from mimovl import MiMoVL
from processor import Processor
from rewards import DATA_REWARDS, RewardPool, passed, register_reward_model, reward_tag
from rollouts import (VISION_KEYS, EasyPool, PromptStream, collect_groups, heldout_prompts, prompt_from_id,
                      sample_groups, score_groups)


# -----------------------------------------------------------------------------
# 1. GRPO math: group advantages, the loss normaliser, the policy loss
# -----------------------------------------------------------------------------

def group_advantages(rewards, eps=1e-6):
    """A = (r - mean) / (std + eps) within each group. rewards: (n_groups, G) -> (n_groups, G).

    std is the sample standard deviation (divisor G - 1), as in verl's GRPO (the framework
    MiMo-VL trained with) and TRL; the report writes std() without saying which. A group whose
    rewards are all equal gets advantage exactly 0 (r - mean can be one rounding step off 0).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64 if not torch.is_tensor(rewards) else None)
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must have shape (n_groups, G) with G >= 2, got {tuple(r.shape)}")
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    all_equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(r), (r - mean) / (std + eps))


LOSS_NORMS = ("group", "token-mean")


def loss_weights(lengths, norm="group", n_groups=None, n_tokens=None):
    """w_i, the weight of every token of response i in L = sum_i w_i sum_t loss_i,t.
    lengths: (n_groups, G) token counts |o_i|, 0 for a response that does not count.

      group       w_i = 1 / (n_groups * sum_{j in i's group} |o_j|)     report eq. 1 (default)
      token-mean  w_i = 1 / sum_{all j in the batch} |o_j|              verl's "token-mean"

    n_groups / n_tokens: the totals over all ranks (default: over `lengths`), so that ranks and
    micro-batches add up to the loss of the whole batch. Groups without tokens do not count."""
    n = torch.as_tensor(lengths, dtype=torch.float64)
    if norm == "group":
        groups = float((n.sum(1) > 0).sum()) if n_groups is None else n_groups
        denom = groups * n.sum(1, keepdim=True).expand_as(n)
    elif norm == "token-mean":
        denom = torch.full_like(n, float(n.sum()) if n_tokens is None else n_tokens)
    else:
        raise ValueError(f"loss normaliser must be one of {LOSS_NORMS}, got {norm!r}")
    return torch.where(n > 0, 1.0 / denom.clamp(min=1.0), torch.zeros_like(n))


def policy_loss(logprobs, advantages, weights, old_logprobs=None, mode="onpolicy", eps_low=0.2,
                eps_high=0.28, kl_beta=0.0, ref_logprobs=None):
    """sum over tokens of weight * per-token loss, for one batch of responses.

    logprobs (B, T): log pi_theta of the sampled tokens (with grad); advantages (B,) or (B, T);
    weights (B, T): loss_weights on response tokens, 0 on prompt and padding.
      onpolicy  -A log pi_theta: one step per batch, so pi_old == pi_theta and the clipped
                surrogate below would have the same gradient, A grad(log pi) (its value is -A)
      grpo      -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - old_logp)
      kl_beta   adds kl_beta * k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
                unbiased, non-negative estimator of KL(pi_theta || pi_ref))
    """
    adv = advantages.to(logprobs.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv                     # (B, 1) broadcasts over T
    if mode == "onpolicy":
        per_token = -adv * logprobs
    elif mode == "grpo":
        if old_logprobs is None:
            raise ValueError("mode 'grpo' needs old_logprobs (log-probs of the sampling policy)")
        ratio = torch.exp(logprobs - old_logprobs.detach())
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    else:
        raise ValueError(f"mode must be 'onpolicy' or 'grpo', got {mode!r}")
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs from the frozen reference model")
        d = ref_logprobs.detach() - logprobs
        per_token = per_token + kl_beta * (torch.exp(d) - d - 1.0)
    return (per_token * weights.to(logprobs.dtype)).sum()


@dataclass
class RLConfig:
    """The knobs of the rollout and the update (the command line fills them)."""
    algo: str = "onpolicy"          # "onpolicy" (MiMo-VL) or "grpo" (vanilla, clipped)
    group_size: int = 8             # G responses per prompt
    prompts_per_rank: int = 8       # groups per rollout batch on each rank
    loss_norm: str = "group"        # LOSS_NORMS: report eq. 1, or DAPO's token-mean
    temperature: float = 1.0        # only 1: the update's log-probs are the policy's own
    top_p: float = 1.0              # only 1, for the same reason
    max_new_tokens: int = None      # None: RESPONSE_BUDGET of each task
    updates_per_batch: int = 1      # optimiser steps per rollout batch (on-policy: exactly 1)
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_beta: float = 0.0
    dynamic_sampling: bool = True
    max_refills: int = 2            # extra sampling rounds to refill dropped groups
    max_tokens: int = 4096          # tokens per packed row of the update
    max_rows: int = 128             # sequences per generate call (G per prompt)
    grad_clip: float = 1.0

    def validate(self):
        if self.algo not in ("onpolicy", "grpo"):
            raise ValueError(f"--algo must be onpolicy or grpo, got {self.algo!r}")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"--loss-norm must be one of {', '.join(LOSS_NORMS)}, got {self.loss_norm!r}")
        if self.temperature != 1.0 or self.top_p != 1.0:
            raise ValueError(f"--temperature {self.temperature:g} / --top-p {self.top_p:g}: rollouts "
                             "must sample from the policy itself (temperature 1, top-p 1), because the "
                             "update's log-probs are those of the full untempered softmax; any other "
                             "sampling distribution makes the policy gradient biased")
        if self.algo == "onpolicy" and self.updates_per_batch != 1:
            raise ValueError("--algo onpolicy takes exactly one optimiser step per rollout batch "
                             f"(--updates-per-batch 1), got {self.updates_per_batch}; use --algo grpo")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (advantages compare responses within a "
                             f"group), got {self.group_size}")
        if self.prompts_per_rank < self.updates_per_batch:
            raise ValueError(f"each rank needs at least one prompt per update: --prompts-per-step / "
                             f"ranks = {self.prompts_per_rank} < --updates-per-batch "
                             f"{self.updates_per_batch}")
        return self


# -----------------------------------------------------------------------------
# 2. The update: packed rows, log-probs from the training forward, the optimiser step
# -----------------------------------------------------------------------------

class Policy(MiMoVL):
    """MiMoVL whose forward() can also return per-token log-probs (MiMoVL.token_logprobs).
    DDP hooks its gradient all-reduce into forward(), so the RL update has to go through it."""

    def forward(self, input_ids, labels=None, token_logprobs=False, with_entropy=False, **inputs):
        if token_logprobs:
            out = self.token_logprobs(input_ids, labels, with_entropy=with_entropy, **inputs)
            # copies, not views: FSDP2 hooks its backward into this output, and warns on views
            return tuple(x.clone() for x in out) if with_entropy else out.clone()
        return super().forward(input_ids, labels=labels, **inputs)


ROW_KEYS = ("adv", "weight", "sampled")     # per-token values that travel with a packed row


def pack_rows(groups, advantages, weights, max_tokens=4096, processor=None, video=False):
    """The rows of the update: each response as its own document `prompt + response` (labels
    on the response, its stop token included) packed with others of its task into (1, T) rows
    with cu_seqlens (packing.best_fit_pack / collate_packed), as in pre-training. Aligned with
    input_ids, each row also has `adv` (advantage), `weight` (loss_weights, 0 off the response)
    and `sampled` (the sampler's log-probs). With `processor` (DDP) a row without pixels gets a
    dummy image (training.add_dummy_vision) so every ViT parameter gets a gradient; with
    video=True (FSDP2) also a dummy video, so every rank calls the vision tower equally often."""
    by_task = {}
    for g, adv, w in zip(groups, advantages.tolist(), weights.tolist()):
        p = g.encoded["input_ids"]
        vision = {k: g.encoded[k] for k in VISION_KEYS if k in g.encoded}
        for r, a, wi in zip(g.responses, adv, w):
            ids = torch.cat([p, torch.tensor(r.ids, dtype=p.dtype)])
            labels = torch.full_like(ids, packing.IGNORE_INDEX)
            labels[len(p):] = ids[len(p):]
            seq = {"input_ids": ids, "labels": labels, "task": g.task, **vision,
                   **{k: torch.zeros(len(ids)) for k in ROW_KEYS}}
            seq["adv"][len(p):], seq["weight"][len(p):] = a, wi
            seq["sampled"][len(p):] = torch.tensor(r.logprobs)
            by_task.setdefault(g.task, []).append(seq)
    rows = []
    for task, seqs in by_task.items():
        lengths = [len(s["input_ids"]) for s in seqs]
        for idx in packing.best_fit_pack(lengths, max(max_tokens, max(lengths))):
            part = [seqs[i] for i in idx]
            row = packing.collate_packed(part)
            for k in ROW_KEYS:
                row[k] = torch.cat([s[k] for s in part])[None]
            if processor is not None:
                n = row["input_ids"].shape[1]
                row = training.add_dummy_vision(row, processor, video)
                for k in ROW_KEYS:
                    row[k] = F.pad(row[k], (0, row["input_ids"].shape[1] - n))
            row["task"], row["mask"] = task, (row["weight"] > 0).float()
            rows.append(row)
    return rows


def row_logprobs(model, row, device, with_entropy=False):
    """log pi of the row's labelled tokens (1, T) [and their entropies] by the packed training
    forward (Policy.forward -> MiMoVL.token_logprobs)."""
    return model(row["input_ids"].to(device), labels=row["labels"].to(device), token_logprobs=True,
                 with_entropy=with_entropy, cu_seqlens=row["cu_seqlens"].to(device),
                 **packing.vision_inputs(row, device))


def batch_weights(groups, norm, compute):
    """loss_weights of this rank's groups with the totals over all ranks, times the number of
    ranks (DDP averages the ranks' gradients; the loss is their sum)."""
    lengths = torch.tensor([[0.0 if g.padding or not r.trainable else float(len(r.ids))
                             for r in g.responses] for g in groups], dtype=torch.float64)
    totals = training.all_reduce_sum(torch.stack([(lengths.sum(1) > 0).sum().double(),
                                                  lengths.sum()]), compute)
    return loss_weights(lengths, norm, float(totals[0]), float(totals[1])) * compute.world_size


def even_rows(rows, compute):
    """FSDP2 gathers each unit's weights in every forward and reduce-scatters in every backward,
    collectively: all ranks must run as many micro-batches. A rank with fewer rows repeats its
    last one with zero weight (it adds nothing to the loss or the gradient)."""
    n = int(training.all_reduce_max(torch.tensor(len(rows)), compute))
    blank = {**rows[-1], "adv": torch.zeros_like(rows[-1]["adv"]), "weight": torch.zeros_like(
        rows[-1]["weight"]), "mask": torch.zeros_like(rows[-1]["mask"])}
    return rows + [dict(blank) for _ in range(n - len(rows))]


def policy_update(wrapped, optimizer, groups, cfg, compute, processor=None, ref_model=None):
    """One rollout batch -> cfg.updates_per_batch optimiser steps (on-policy: exactly one), each
    on its share of the groups. vanilla GRPO's pi_old is the training forward before the first
    step (the sampler's log-probs differ by numerics: KV cache, batching). Returns the metrics
    of each step (update_metrics)."""
    model, device = training.unwrap(wrapped), compute.device
    sharded = training.is_sharded(wrapped)
    adv = group_advantages([g.rewards for g in groups]).float()                 # (n_groups, G)
    minibatches = []
    for idx in np.array_split(np.arange(len(groups)), cfg.updates_per_batch):
        idx = idx.tolist()
        part = [groups[i] for i in idx]
        rows = pack_rows(part, adv[idx], batch_weights(part, cfg.loss_norm, compute),
                         cfg.max_tokens, processor, video=sharded)
        minibatches.append(even_rows(rows, compute) if sharded else rows)
    if cfg.algo == "grpo" or cfg.kl_beta > 0:
        with torch.no_grad(), compute.autocast():
            for row in (row for rows in minibatches for row in rows):
                if cfg.algo == "grpo":
                    row["old"] = row_logprobs(model, row, device).float().cpu()
                if cfg.kl_beta > 0:
                    row["ref"] = row_logprobs(ref_model, row, device).float().cpu()
        if sharded:
            # FSDP2 leaves the root unit gathered after a forward without backward, and its
            # gathered tensors replace the sharded parameters in .parameters(): the gradient
            # clipping below would miss them (it did: a smaller norm, lm_head left unclipped)
            for m in (wrapped, ref_model if cfg.kl_beta > 0 else None):
                if m is not None:
                    m.reshard()
    model.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    steps = []
    for rows in minibatches:
        n_tokens = training.all_reduce_sum(torch.tensor(sum(float(r["mask"].sum()) for r in rows)), compute)
        if n_tokens == 0:                          # nothing to learn from on any rank
            continue
        for i, row in enumerate(rows):
            with training.grad_sync(wrapped, i == len(rows) - 1), compute.autocast():
                lp, entropy = row_logprobs(wrapped, row, device, with_entropy=True)
                loss = policy_loss(lp.float(), row["adv"].to(device), row["weight"].to(device),
                                   row["old"].to(device) if "old" in row else None, cfg.algo,
                                   cfg.eps_low, cfg.eps_high, cfg.kl_beta,
                                   row["ref"].to(device) if "ref" in row else None)
            loss.backward()
            row.update(logp=lp.detach().float().cpu(), entropy=entropy.float().cpu(), loss=float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP2: a DTensor
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the gradient norm is {norm}: the update is skipped and "
                                     "training stops; lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(update_metrics(rows, norm, cfg, compute))
    return steps


def update_metrics(rows, grad_norm, cfg, compute):
    """One optimiser step's metrics over all ranks: the loss, the gradient norm, token means of
    |log pi_sampler - log pi_train| (numerics only, on-policy), the ratio and clipped fraction
    (grpo), the k3 KL, and each task's mean entropy."""
    sums = {}

    def add(key, x, mask):
        sums[key] = sums.get(key, 0.0) + float((x * mask).sum())
    for row in rows:
        m, lp, task = row["mask"], row["logp"], row["task"]
        sums["loss"] = sums.get("loss", 0.0) + row["loss"] / compute.world_size
        add("tokens", 1.0, m)
        add("logprob_diff", (lp - row["sampled"]).abs(), m)
        if "old" in row:
            ratio = torch.exp(lp - row["old"])
            add("ratio_mean", ratio, m)
            clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
            add("clip_frac", (ratio * row["adv"] > clipped * row["adv"]).float(), m)
        if "ref" in row:
            d = row["ref"] - lp
            add("kl", torch.exp(d) - d - 1.0, m)
        add(f"entropy/{task}", row["entropy"], m)
        add(f"tokens/{task}", 1.0, m)
    total = {}
    for part in training.gather_objects(sums, compute):
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    n = max(total.pop("tokens"), 1.0)
    out = {"loss": total.pop("loss"), "grad_norm": grad_norm, "tasks": {}}
    for k, v in total.items():
        if k.startswith("entropy/"):
            out["tasks"][k[8:]] = {"entropy": v / max(total["tokens/" + k[8:]], 1.0)}
        elif not k.startswith("tokens/"):
            out[k] = v / n
    return out


# -----------------------------------------------------------------------------
# 3. Evaluation beside training: avg@k and the choice of tasks
# -----------------------------------------------------------------------------

def evaluate_sampled(model, processor, prompts, compute, pool, k, seed=0, max_rows=128):
    """avg@k: the mean reward of k responses sampled per held-out prompt, as in the rollouts
    -> {task: {reward, pass, length, n}}. It is the policy's expected reward, what RL maximises
    (the report's Fig. 7 plots avg@32); greedy answers can move differently, so the before/after
    table shows both. The seed is fixed: SFT and RL models see the same random stream."""
    mine = prompts[compute.rank::compute.world_size]
    groups = sample_groups(model, processor, mine, k, seed=seed, max_rows=max_rows,
                           slots=range(compute.rank, len(prompts), compute.world_size)) if mine else []
    score_groups(groups, pool)
    return summarise_rewards(sum(training.gather_objects(step_records(groups), compute), []))


def paired_bootstrap(before, after, tasks, n=2000, seed=0):
    """The change of the mean greedy reward over `tasks` (each task's mean, averaged) with a 95 %
    interval: prompts resampled with replacement within each task, the same prompts before and
    after (before / after: [(task, reward)] per held-out prompt, in the same order)."""
    rng = np.random.default_rng(seed)
    diffs = [np.array([a[1] - b[1] for b, a in zip(before, after) if b[0] == task]) for task in tasks]
    diffs = [d for d in diffs if len(d)]
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    boot = np.mean([d[rng.integers(0, len(d), (n, len(d)))].mean(1) for d in diffs], axis=0)
    return float(np.mean([d.mean() for d in diffs])), *np.percentile(boot, [2.5, 97.5]).tolist()


# Tasks are chosen on the SFT model's sampled responses (avg@SELECT_SAMPLES), not its greedy
# answers: RL learns from, and climbs, the reward of its samples. Measured in this project on the
# stage-4 model: visual math answers right 17 % greedy but 8 % sampled (no-image 2 %); trained,
# its greedy reward fell in 4 of 5 runs (-0.06 to -0.09) and pulled the mean over the trained
# tasks down; chosen on samples, it is left out (and shows in the table as an untrained task).
SELECT_SAMPLES = 4


def select_tasks(sft, blank, min_gain=0.1):
    """The tasks RL can improve: those where the SFT model's held-out reward (`sft`: sampled,
    see SELECT_SAMPLES) beats its greedy reward with black images by more than min_gain (it uses
    the image, so its groups carry reward signal). Text-only tasks have no such baseline and are
    trained only when named with --tasks. Returns (tasks, {task: why})."""
    tasks, why = [], {}
    for task, m in sft.items():
        if task not in blank:
            why[task] = f"text only (name it with --tasks to train it), SFT {m['reward']:.3f}"
            continue
        why[task] = f"SFT avg@{SELECT_SAMPLES} {m['reward']:.3f} vs no-image {blank[task]['reward']:.3f}"
        if m["reward"] > blank[task]["reward"] + min_gain:
            tasks.append(task)
    return tasks, why


def baseline_eval(args, compute, processor, pool, eval_tasks):
    """The SFT model's held-out rewards with real and with black images, on the prompts of the
    before/after table and (--tasks auto) on the separate prompts that choose the tasks; avg@k.
    Cached in <out>/eval_sft.json under a key of everything it depends on."""
    path = os.path.join(args.out, "eval_sft.json")
    key = {"sft": os.path.abspath(args.sft), "tasks": eval_tasks, "n": args.eval_n,
           "seed": args.seed, "rm": args.rm, "select": args.tasks == "auto",
           "samples": args.eval_samples, "select_samples": SELECT_SAMPLES}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    model = MiMoVL.from_pretrained(args.sft, dtype=torch.float32, device=compute.device,
                                   progress=False).eval()
    res = {"key": key}
    for prefix, first in [("", 0)] + ([("select_", args.eval_n)] if key["select"] else []):
        prompts = heldout_prompts(eval_tasks, args.eval_n, args.seed, first)
        for name, blank in (("sft", False), ("blank", True)):
            res[prefix + name], recs = evaluate_rewards(model, processor, prompts, compute, pool,
                                                        args.eval_batch, blank=blank)
            res[prefix + name + "_records"] = [(r["task"], r["reward"]) for r in recs]
    if key["select"]:
        res["select_sft_sampled"] = evaluate_sampled(model, processor, heldout_prompts(
            eval_tasks, args.eval_n, args.seed, args.eval_n), compute, pool, SELECT_SAMPLES,
            args.seed, args.gen_rows)
    if args.eval_samples:
        res["sft_sampled"] = evaluate_sampled(model, processor, heldout_prompts(
            eval_tasks, args.eval_n, args.seed), compute, pool, args.eval_samples, args.seed,
            args.gen_rows)
    if compute.master:
        write_json_atomic(path, res)
    return res


# -----------------------------------------------------------------------------
# 4. The RL run
# -----------------------------------------------------------------------------

def default_sft():
    return os.path.join(train_pretrain.build_parser().get_default("out"), "stage4")


def check_sft(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
        training.fail(f"no SFT model at {path}: RL starts from the stage-4 output of pre-training. "
                      f"Run `python train_pretrain.py` first (it writes {default_sft()}), or pass --sft DIR")
    return path


def write_progress(out, phase, step, total, status, compute):
    """<out>/progress.json: where the run is, for `--all`'s progress bar (and anyone watching)."""
    if compute.master:
        write_json_atomic(os.path.join(out, "progress.json"),
                          {"phase": phase, "step": step, "total": total, "status": status})


def step_records(groups):
    return [{"task": g.task, "reward": r.reward, "pass": float(passed(reward_tag(g.prompt), r.reward)),
             "length": len(r.ids), "truncated": float(r.truncated)}
            for g in groups for r in g.responses]


def step_log(step, lr, records, kept, sampled, easy, updates, compute):
    """The metrics.jsonl record of a step: rewards, pass rate, length and truncation over all
    sampled responses, overall and per task; the first (and, with several, the last) update's
    metrics; the group counts of dynamic sampling and the easy pool."""
    counts = training.all_reduce_sum(torch.tensor(
        [len(sampled), sum(not g.padding for g in kept), len(easy), sum(g.from_easy for g in sampled)],
        dtype=torch.float64), compute).tolist()
    per_task = summarise_rewards(records)
    for task in per_task:
        rs = [r for r in records if r["task"] == task]
        per_task[task]["truncated"] = sum(r["truncated"] for r in rs) / len(rs)
    first = dict(updates[0]) if updates else {"tasks": {}}
    for task, m in first.pop("tasks").items():
        per_task.setdefault(task, {}).update(m)
    rec = {"step": step, "lr": lr, **{k: sum(r[k] for r in records) / len(records)
                                      for k in ("reward", "pass", "length", "truncated")},
           "sampled_groups": int(counts[0]), "kept_groups": int(counts[1]),
           "easy_pool": int(counts[2]), "from_easy": int(counts[3]), "updates": len(updates), **first}
    if len(updates) > 1:                                            # vanilla GRPO: the last one
        rec.update({f"last_{k}": v for k, v in updates[-1].items() if k != "tasks"})
    return {**rec, "tasks": per_task}


def progress_line(rec):
    """The progress bar's summary of a step: mean and per-task reward, then pass rate, response
    length, truncation rate, mean entropy, gradient norm and kept/sampled groups."""
    per_task = rec["tasks"]
    short = {t: t if len(t) <= 6 else "".join(w[:3] for w in t.split("_")) for t in per_task}
    tasks = " ".join(f"{short[t]} {m['reward']:.2f}" for t, m in sorted(per_task.items()) if "reward" in m)
    entropy = [m["entropy"] for m in per_task.values() if "entropy" in m]
    return (f"r {rec['reward']:.2f} {tasks} | pass {rec['pass']:.2f} len {rec['length']:.0f} "
            f"trunc {rec['truncated']:.2f} H {sum(entropy) / max(len(entropy), 1):.2f} "
            f"gn {rec.get('grad_norm', 0.0):.2f} kept {rec['kept_groups']}/{rec['sampled_groups']}")


def print_debug(groups, compute, n_groups=2, n_responses=3):
    for g in groups[:n_groups]:
        content = g.prompt["messages"][-1]["content"]
        question = content if isinstance(content, str) else " ".join(
            it["text"] for it in content if it.get("type") == "text")
        compute.print(f"\n[debug] {g.task} ({reward_tag(g.prompt)}) {question!r} -> truth "
                      f"{g.prompt['answer']!r}; rewards {[round(x, 2) for x in g.rewards]}")
        for r in g.responses[:n_responses]:
            comps = {k: v for k, v in r.components.items() if k != "extracted_by"}
            compute.print(f"    {r.reward:.2f} {'(truncated) ' if r.truncated else ''}{r.text!r:.120} "
                          f"{json.dumps(comps, default=str)[:160]}")


def setup_rewards(args, compute, processor, tasks, stack):
    """The reward pool, and the reward model when one is available (--rm): registered for the
    "preference" task. Tasks scored by a missing reward model are dropped, with a note. Both are
    closed with `stack` (a contextlib.ExitStack)."""
    pool = stack.enter_context(RewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout))
    rm_path = os.path.join(args.out, "reward_model") if args.rm == "auto" else args.rm
    if args.rm == "none" or (args.rm == "auto" and not os.path.isfile(
            os.path.join(rm_path, "extra.safetensors"))):
        rm_path = None
    register_reward_model(None)
    if rm_path:
        score, record = reward_model.preference_scorer(rm_path, processor, compute, args.rm_device, stack)
        register_reward_model(score)
        compute.print(f"reward model: {rm_path} (held-out pair accuracy "
                      f"{record.get('after', {}).get('accuracy', float('nan')):.3f}) scores the open-ended tasks")
        return pool, tasks
    rm_tasks = [t for t in tasks if DATA_REWARDS.get(rl_tag_of(t)) == "preference"]
    if rm_tasks:
        compute.print(f"no reward model ({os.path.join(args.out, 'reward_model')} not found): "
                      f"skipping {', '.join(rm_tasks)}; train one with `python train_rl.py "
                      "--train-rm` for the full MORL mix")
    return pool, [t for t in tasks if t not in rm_tasks]


def choose_tasks(args, compute, base, eval_tasks):
    if args.tasks != "auto":
        return eval_tasks
    tasks, why = select_tasks(base["select_sft_sampled"], base["select_blank"], args.min_gain)
    compute.print(f"task selection on {args.eval_n} separate held-out prompts per task (RL needs "
                  "reward signal: the SFT model must beat its no-image baseline):\n" + "\n".join(
                      f"  {'train' if t in tasks else 'skip '} {t:<16} {why[t]}" for t in why))
    if not tasks:
        training.fail("no task has reward signal: the SFT model is no better than with black "
                      "images anywhere. Train the SFT model longer (train_pretrain.py --scale) or "
                      "name tasks with --tasks")
    return tasks


@dataclass
class Trainer:
    """Everything one RL run updates, and what a checkpoint restores."""
    policy: Policy
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    ref_model: Policy
    stream: PromptStream
    easy: EasyPool
    tasks: list
    step: int = 0
    seen: int = 0           # responses trained on (non-padding groups x G)
    engine: MiMoVL = None   # FSDP2: the rollout copy (rollout_weights); else the policy samples


def sharded_policy(config_folder, weights, compute, trainable=None, grad_checkpointing=False):
    """An FSDP2 policy that no rank ever holds whole: built on the meta device from
    `config_folder`'s config.json, sharded, each rank reading only its rows of the folder
    `weights` (training.wrap_model; None: the shards are left for load_training_state).
    trainable None: a frozen model (the KL reference)."""
    policy = training.meta_model(config_folder, Policy)
    if trainable is None:
        policy.requires_grad_(False)
    else:
        training.set_trainable(policy, trainable)
    policy.visual.gradient_checkpointing = policy.model.gradient_checkpointing = grad_checkpointing
    return training.wrap_model(policy, compute, fsdp=True, weights=weights)


@contextlib.contextmanager
def rollout_weights(t, compute):
    """The model that samples: the policy itself, or under FSDP2 a full copy of its current
    weights in the generation dtype (bf16 on GPUs), gathered one tensor at a time
    (DTensor.full_tensor) into a model allocated for the rollout and freed after it, as verl's
    hybrid engine hands FSDP weights to its rollout engine and takes the memory back for the
    update. Each rank generates alone (no collectives during decoding)."""
    if t.engine is None:
        yield t.policy
        return
    from torch.distributed.tensor import DTensor
    engine = t.engine.to_empty(device=compute.device)
    with torch.no_grad():
        mine = engine.state_dict()
        for name, x in t.wrapped.state_dict().items():
            mine[name].copy_(x.full_tensor() if isinstance(x, DTensor) else x)
    try:
        yield engine.eval()
    finally:
        engine.to("meta")                      # frees the copy: the update needs the memory


def start_trainer(args, compute, cfg, processor, tasks):
    """The policy (from the SFT model, or the newest intact checkpoint with --resume), its
    optimiser, the frozen reference (KL only), the prompt stream and the easy pool. With --fsdp
    under torchrun the policy (and reference) are FSDP2-sharded (sharded_policy) and sample
    through rollout_weights."""
    root = os.path.join(args.out, "checkpoints")
    resume_from = training.resume_checkpoint(root, log=compute.print) if args.resume else None
    trainable = tuple(x for x in args.trainable.split("+") if x)
    fsdp = args.fsdp and compute.distributed
    if args.fsdp and not fsdp:
        compute.print("--fsdp: one process, nothing to shard (start it with torchrun to shard the policy)")
    ref, engine = None, None
    if fsdp:
        sharded_resume = resume_from and training.is_sharded_checkpoint(resume_from)
        policy = wrapped = sharded_policy(resume_from or args.sft, None if sharded_resume else
                                          resume_from or args.sft, compute, trainable,
                                          args.grad_checkpointing)
        if cfg.kl_beta > 0:
            ref = sharded_policy(args.sft, args.sft, compute).eval()
        with torch.device("meta"):
            engine = MiMoVL(policy.cfg).to(compute.eval_dtype)
    else:
        if resume_from and training.is_sharded_checkpoint(resume_from):    # FSDP2 run, now one process
            policy = training.meta_model(resume_from, Policy).to_empty(device="cpu")
        else:
            policy = Policy.from_pretrained(resume_from or args.sft, dtype=torch.float32, progress=False)
        training.set_trainable(policy, trainable)
        policy.visual.gradient_checkpointing = policy.model.gradient_checkpointing = args.grad_checkpointing
        if cfg.kl_beta > 0:
            ref = Policy.from_pretrained(args.sft, dtype=torch.float32, device=compute.device,
                                         progress=False).eval().requires_grad_(False)
        wrapped = training.wrap_model(policy.to(compute.device), compute)
    opt = training.build_optimizer(wrapped, args.lr, args.weight_decay, (0.9, 0.999), compute.device)
    step, loader = 0, {}
    if resume_from:
        step, loader, ts = training.load_training_state(resume_from, wrapped, opt, compute)
        tasks = ts.get("tasks", tasks)
        compute.print(f"resuming from {resume_from} (step {step})")
    for name in ("metrics.jsonl", "eval.jsonl"):       # drop what the resumed steps log again
        training.JsonlLog(os.path.join(args.out, name), compute).keep_only(lambda r: r["step"] <= step)
    t = Trainer(policy, wrapped, opt, ref, PromptStream(tasks, args.seed, compute.rank,
                compute.world_size, loader.get("position", 0)),
                EasyPool(args.easy_prob, seed=args.seed * 1000 + compute.rank), tasks, step,
                loader.get("prompts_seen", 0), engine)
    if loader.get("easy") is not None:
        t.easy.easy = {k: prompt_from_id(k, args.seed) for k in loader["easy"]}
        s = loader["easy_rng"]
        t.easy.rng.setstate((s[0], tuple(s[1]), s[2]))
    return t


def train(args, compute, cfg, processor, pool, t):
    """The RL loop: rollout batch -> update -> metrics, held-out curve, checkpoint."""
    from tqdm import tqdm
    metrics = training.JsonlLog(os.path.join(args.out, "metrics.jsonl"), compute)
    curve = training.JsonlLog(os.path.join(args.out, "eval.jsonl"), compute)
    curve_prompts = heldout_prompts(t.tasks, args.eval_n, args.seed) if args.eval_every else None
    schedule = dict(lr=args.lr, min_lr=args.lr, warmup=args.warmup, steps=args.steps)
    bar = tqdm(total=args.steps, initial=t.step, desc="rl", disable=not compute.master,
               dynamic_ncols=True, mininterval=1, file=sys.stdout)
    while t.step < args.steps:
        lr = training.lr_at(t.step, **schedule)
        for g in t.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        with rollout_weights(t, compute) as model:
            kept, sampled = collect_groups(model, processor, t.stream, t.easy, pool, cfg,
                                           args.seed * 1_000_003 + t.step * 1009, compute.rank,
                                           compute.world_size)
        t1 = time.perf_counter()
        updates = policy_update(t.wrapped, t.optimizer, kept, cfg, compute,
                                processor if compute.distributed else None, t.ref_model)
        t.step += 1
        records = sum(training.gather_objects(step_records(sampled), compute), [])
        rec = step_log(t.step, lr, records, kept, sampled, t.easy, updates, compute)
        t.seen += rec["kept_groups"] * cfg.group_size
        rec.update(responses_trained=t.seen, rollout_s=round(t1 - t0, 2),
                   update_s=round(time.perf_counter() - t1, 2), time=time.time())
        metrics.write(rec)
        bar.update(1)
        bar.set_postfix_str(progress_line(rec))
        write_progress(args.out, "rl", t.step, args.steps, progress_line(rec), compute)
        if args.debug:
            print_debug(sampled, compute)
        if args.eval_every and (t.step % args.eval_every == 0 or t.step == args.steps):
            with rollout_weights(t, compute) as model:
                res, _ = evaluate_rewards(model, processor, curve_prompts, compute, pool, args.eval_batch)
                res_k = evaluate_sampled(model, processor, curve_prompts, compute, pool, args.eval_samples,
                                         args.seed, args.gen_rows) if args.eval_samples else None
            curve.write({"step": t.step, "responses_trained": t.seen, "tasks": res, "sampled": res_k})
            bar.write(f"step {t.step}: held-out reward (greedy) " + " ".join(
                f"{k} {m['reward']:.3f}" for k, m in res.items()) + (f"; avg@{args.eval_samples} " + " ".join(
                    f"{k} {m['reward']:.3f}" for k, m in res_k.items()) if res_k else ""))
        if args.save_every and t.step % args.save_every == 0 and t.step < args.steps:
            state = {"position": t.stream.position, "easy": list(t.easy.easy),
                     "easy_rng": t.easy.rng.getstate(), "prompts_seen": t.seen}
            training.save_training_state(os.path.join(args.out, "checkpoints"), t.step, t.wrapped,
                                         t.optimizer, t.policy.cfg, processor, state, compute,
                                         args.keep_last, {"stage": "rl", "tasks": t.tasks})
        if args.debug_stop_after and t.step == args.debug_stop_after:
            bar.close()
            compute.print(f"stopping after step {t.step} (--debug-stop-after)")
            raise SystemExit(3)
    bar.close()


def finish(args, compute, cfg, processor, pool, t, base, eval_tasks, t_start):
    """The RL model's folder, its held-out rewards, and the before/after table (summary.md)."""
    final = os.path.join(args.out, "final")
    train_minutes = (time.perf_counter() - t_start) / 60
    record = {"stage": "rl", "algo": cfg.algo, "steps": args.steps, "tasks": t.tasks,
              "started_from": os.path.abspath(args.sft), "config": asdict(cfg), "args": vars(args)}
    if training.is_sharded(t.wrapped):      # streamed, one parameter at a time: no full state dict
        training.save_stage_streamed(final + ".partial", t.wrapped, t.policy.cfg, processor, record, compute)
    else:
        state = training.full_state(t.wrapped)
        if compute.master:
            training.save_stage_folder(final + ".partial", state, t.policy.cfg, processor, record)
    compute.barrier()
    write_progress(args.out, "rl", args.steps, args.steps, "held-out rewards of the RL model", compute)
    prompts = heldout_prompts(eval_tasks, args.eval_n, args.seed)
    with rollout_weights(t, compute) as model:
        after, recs = evaluate_rewards(model, processor, prompts, compute, pool, args.eval_batch)
        after_k = evaluate_sampled(model, processor, prompts, compute, pool, args.eval_samples,
                                   args.seed, args.gen_rows) if args.eval_samples else None
    change, lo, hi = paired_bootstrap(base["sft_records"], [(r["task"], r["reward"]) for r in recs], t.tasks)
    table = results_table(base["sft"], after, base["blank"], t.tasks, base.get("sft_sampled"),
                          after_k, args.eval_samples) + (
        f"\n\nmean greedy change over the trained tasks {change:+.3f}, 95 % paired bootstrap "
        f"interval over the held-out prompts [{lo:+.3f}, {hi:+.3f}]")
    minutes = (time.perf_counter() - t_start) / 60
    done = {"tasks": t.tasks, "sft": base["sft"], "rl": after, "blank": base["blank"],
            "mean_sft": mean_reward(base["sft"], t.tasks), "mean_rl": mean_reward(after, t.tasks),
            "greedy_change_ci95": [lo, hi],
            "sft_sampled": base.get("sft_sampled"), "rl_sampled": after_k, "table": table,
            "minutes": round(minutes, 2), "train_minutes": round(train_minutes, 2),
            "examples": {r["task"]: {"response": r["response"], "answer": r["answer"]} for r in recs}}
    if compute.master:
        with open(os.path.join(final + ".partial", "rl.json"), "w") as f:
            json.dump(done, f, indent=1, default=str)
        training.commit_dir(final + ".partial", final)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(f"MORL ({cfg.algo}), {args.steps} steps, held-out reward ({args.eval_n} "
                    f"prompts per task, greedy), {minutes:.1f} min\n\n{table}\n")
    compute.print(f"\nheld-out reward before (SFT) and after MORL ({args.eval_n} prompts per task, "
                  f"greedy; no-image = the SFT model given black images):\n{table}\n"
                  f"\nwrote {final}; {minutes:.1f} min in all")
    return done


def rl_config(args, compute):
    if args.rm_device:
        try:
            kind = torch.device(args.rm_device.replace("{local_rank}", "0")).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            training.fail(f"--rm-device {args.rm_device!r}: use cpu, cuda, cuda:N or cuda:{{local_rank}} "
                          "(the GPU of each rank)")
    per_rank = args.prompts_per_step // compute.world_size
    if per_rank * compute.world_size != args.prompts_per_step:
        training.fail(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number "
                      f"of processes ({compute.world_size})")
    try:
        return RLConfig(algo=args.algo, group_size=args.group_size, prompts_per_rank=per_rank,
                        loss_norm=args.loss_norm, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens,
                        updates_per_batch=args.updates_per_batch or (1 if args.algo == "onpolicy" else 4),
                        eps_low=args.eps_low, eps_high=args.eps_high, kl_beta=args.kl_beta,
                        dynamic_sampling=not args.no_dynamic_sampling, max_refills=args.max_refills,
                        max_tokens=args.max_tokens, max_rows=args.gen_rows,
                        grad_clip=args.grad_clip).validate()
    except ValueError as e:
        training.fail(str(e))


RL_OUTPUTS = ("metrics.jsonl", "eval.jsonl", "checkpoints", "final", "summary.md")


def run_rl(args, compute):
    """The MORL run: SFT baseline -> task choice -> RL steps -> final folder -> before/after table."""
    cfg = rl_config(args, compute)
    check_sft(args.sft)
    done_file = os.path.join(args.out, "final", "rl.json")
    if args.resume and os.path.isfile(done_file):
        with open(done_file) as f:
            done = json.load(f)
        compute.print(f"{os.path.dirname(done_file)} is finished (--resume): nothing to do\n\n{done['table']}")
        return done
    training.prepare_run_dir(args.out, args.resume, args.overwrite, RL_OUTPUTS, compute)
    t_start = time.perf_counter()
    processor = Processor.from_pretrained(args.sft)
    all_tasks = list(synthetic.RL_TASKS) if args.tasks in ("auto", "all") else args.tasks.split(",")
    for task in all_tasks:
        if task not in synthetic.RL_TASKS:
            training.fail(f"--tasks: unknown task {task!r}; RL tasks are {', '.join(synthetic.RL_TASKS)}")
    with contextlib.ExitStack() as stack:
        pool, eval_tasks = setup_rewards(args, compute, processor, all_tasks, stack)
        write_progress(args.out, "rl", 0, args.steps, "held-out rewards of the SFT model", compute)
        base = baseline_eval(args, compute, processor, pool, eval_tasks)
        t = start_trainer(args, compute, cfg, processor, choose_tasks(args, compute, base, eval_tasks))
        compute.print(f"\n=== MORL, {args.recipe} recipe ({cfg.algo}{', KL %g' % cfg.kl_beta if cfg.kl_beta else ''}, "
                      f"loss norm {cfg.loss_norm}): {args.steps} steps x {args.prompts_per_step} prompts "
                      f"x G={cfg.group_size}, lr {args.lr:g}, {cfg.updates_per_batch} optimiser "
                      f"step(s) per rollout batch; tasks: {', '.join(t.tasks)}; policy: " +
                      (f"FSDP2-sharded over {compute.world_size} processes" if t.engine is not None else
                       "DDP, a replica per process" if compute.distributed else "one process"))
        if t.engine is not None or compute.device.type == "cuda":
            rm_loaded = any(DATA_REWARDS.get(rl_tag_of(x)) == "preference" for x in eval_tasks)
            rm_here = rm_loaded and (not args.rm_device or args.rm_device == "cuda:{local_rank}")
            est = training.rl_memory_estimate_gib(t.policy.cfg, compute.world_size, cfg.max_tokens,
                                                  max(cfg.group_size, cfg.max_rows), cfg.max_tokens, rm_here)
            compute.print("    estimated memory per GPU with FSDP2 (training.rl_memory_estimate_gib):" +
                          "".join(f"\n    {phase}:\n" + training.format_memory(gib) for phase, gib in est.items()))
        train(args, compute, cfg, processor, pool, t)
        return finish(args, compute, cfg, processor, pool, t, base, eval_tasks, t_start)


# -----------------------------------------------------------------------------
# 5. On-policy vs vanilla GRPO (--compare)
# -----------------------------------------------------------------------------

def compare_algorithms(args, compute):
    """--compare: the report's Fig. 7 at small scale. The same SFT model, prompts and number of
    rollout batches on the reasoning task, once with the on-policy update (one step per batch)
    and once with vanilla GRPO (--updates-per-batch steps per batch, clipped ratio); held-out
    reward (greedy and avg@k) every --eval-every steps, printed side by side."""
    curves = {}
    for algo in ("onpolicy", "grpo"):
        a = argparse.Namespace(**{**vars(args), "algo": algo, "out": os.path.join(args.out, algo),
                                  "rm": "none", "eval_every": args.eval_every or max(1, args.steps // 6),
                                  "tasks": "text_math" if args.tasks == "auto" else args.tasks})
        run_rl(a, compute)
        curves[algo] = training.JsonlLog(os.path.join(a.out, "eval.jsonl")).records()
        with open(os.path.join(a.out, "eval_sft.json")) as f:
            sft = json.load(f)
        curves[algo].insert(0, {"step": 0, "responses_trained": 0, "tasks": sft["sft"],
                                "sampled": sft.get("sft_sampled")})
    k = args.eval_samples

    def mean(rec, key):
        return f"{mean_reward(rec[key], list(rec[key])):.3f}" if rec.get(key) else "-"
    lines = ["| step | responses trained (on-policy / vanilla) | on-policy greedy | vanilla greedy "
             f"| on-policy avg@{k} | vanilla avg@{k} |", "|---|---|---|---|---|---|"]
    lines += [f"| {on['step']} | {on['responses_trained']} / {va['responses_trained']} | "
              f"{mean(on, 'tasks')} | {mean(va, 'tasks')} | {mean(on, 'sampled')} | {mean(va, 'sampled')} |"
              for on, va in zip(curves["onpolicy"], curves["grpo"])]
    table = "\n".join(lines)
    if compute.master:
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table + "\n")
    compute.print("\non-policy (1 step per rollout batch) vs vanilla GRPO (clipped, several steps "
                  f"per batch): mean held-out reward\n{table}")
    return curves


# -----------------------------------------------------------------------------
# 6. Command line
# -----------------------------------------------------------------------------

# --recipe paper: MORL's knobs at the scale of the report. MiMo-VL's report (§3) gives the
# algorithm but none of these numbers; where MiMo-7B's RL (arXiv 2505.07608, §3.3.3: the same
# team's recipe, on text) reports one, it is used, else DAPO's (arXiv 2503.14476, §4.1). The tiny
# recipe (the defaults) is sized for the synthetic world on a CPU. Flags given on the command
# line win over both.
PAPER_RL = {
    "prompts_per_step": 512,    # MiMo-7B: 512 prompts per rollout batch (and DAPO's 512)
    "group_size": 16,           # not in either MiMo report; DAPO samples 16 per prompt
    "max_new_tokens": 32768,    # MiMo-7B: responses up to 32,768 tokens (MiMo-VL's stage 4 is 32K)
    "max_tokens": 36864,        # a packed row of the update holds one full response and its prompt
    "lr": 1e-6,                 # MiMo-7B (and DAPO): 1e-6, constant
    "warmup": 10,               # not reported; a short warm-up, as DAPO's 10 steps
    "tasks": "all",             # MORL trains every task jointly (report §3); no selection by signal
    "fsdp": True,               # a 7B policy and its AdamW state do not fit one GPU
    "grad_checkpointing": True, # a 36K-token row's activations would not fit either
    "gen_rows": 16,             # one prompt's G responses per generate call: their KV cache is
                                # preallocated, 16 x 36,864 tokens x 144 KiB = 81 GiB in bf16 for
                                # MiMo-7B (36 layers, 8 KV heads of 128; rl_memory_estimate_gib)
}


def build_parser():
    p = argparse.ArgumentParser(description="MORL: mixed on-policy RL (MiMo-VL report §3)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--sft", default=default_sft(), help="the SFT model (pre-training stage 4 folder)")
    g.add_argument("--out", default="runs/rl", help="output folder")
    g.add_argument("--train-rm", action="store_true",
                   help="train the Bradley-Terry reward model into <out>/reward_model, then stop")
    g.add_argument("--rm", default="auto", help="reward model folder for the open-ended tasks; "
                   "auto = <out>/reward_model if it exists; none = no reward model")
    g.add_argument("--compare", action="store_true",
                   help="on-policy vs vanilla GRPO on the reasoning task (report Fig. 7)")
    g.add_argument("--all", action="store_true",
                   help="the main job: pre-training, reward model, MORL, tables and a chat answer")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in <out> from its newest intact checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in <out> (metrics, checkpoints, final) and start again")

    g = p.add_argument_group("tasks")
    g.add_argument("--recipe", default="tiny", choices=("tiny", "paper"),
                   help="tiny: these defaults, for the synthetic world on a CPU; paper: the report's "
                        "scale (PAPER_RL: 512 prompts x 16, 32K-token responses, lr 1e-6, all tasks, FSDP2)")
    g.add_argument("--tasks", default="auto", help="comma list of synthetic.RL_TASKS, all, or auto: "
                   "the tasks where the SFT model beats its no-image baseline")
    g.add_argument("--min-gain", type=float, default=0.1,
                   help="auto: the SFT model's sampled reward must beat its no-image reward by this much")

    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="onpolicy", choices=("onpolicy", "grpo"),
                   help="onpolicy: MiMo-VL's update (1 optimiser step per batch, no clipping); "
                        "grpo: vanilla (several clipped steps per batch)")
    g.add_argument("--loss-norm", default="group", choices=LOSS_NORMS,
                   help="group: each group's token mean, averaged over groups (report eq. 1); "
                        "token-mean: one mean over every response token of the batch (verl's DAPO loss)")
    g.add_argument("--steps", type=int, default=40, help="rollout batches")
    g.add_argument("--prompts-per-step", type=int, default=16, help="groups per batch, all ranks")
    g.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    g.add_argument("--lr", type=float, default=3e-5,
                   help="AdamW learning rate, constant after warm-up")
    g.add_argument("--warmup", type=int, default=3, help="warm-up steps")
    g.add_argument("--trainable", default="vit+projector+llm",
                   help="parts of the policy to train, '+'-joined: vit, projector, llm")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--updates-per-batch", type=int, default=None,
                   help="optimiser steps per rollout batch (mini-batches); onpolicy: 1, grpo: 4")
    g.add_argument("--eps-low", type=float, default=0.2, help="grpo: lower clip of the ratio")
    g.add_argument("--eps-high", type=float, default=0.28, help="grpo: upper clip (clip-higher)")
    g.add_argument("--kl-beta", type=float, default=0.0, help="KL penalty to the frozen SFT model")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="rollout temperature: only 1 (the update needs the policy's own samples)")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling: only 1 (idem)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="response budget of every task (default: RESPONSE_BUDGET per task)")
    g.add_argument("--no-dynamic-sampling", action="store_true",
                   help="keep groups whose rewards are all equal")
    g.add_argument("--max-refills", type=int, default=2, help="dynamic sampling: refill rounds")
    g.add_argument("--easy-prob", type=float, default=0.1,
                   help="probability of drawing from the easy pool (prompts every sample passes)")

    g = p.add_argument_group("rewards")
    g.add_argument("--reward-workers", type=int, default=2, help="reward worker processes (0: inline)")
    g.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per reward")
    g.add_argument("--rm-device", default="", help="run the reward model in a process of its own on "
                   "this device (cpu, cuda:N; cuda:{local_rank} = the rank's GPU), one per rank; "
                   "default: inside the training process, on its device")
    g.add_argument("--rm-steps", type=int, default=120, help="--train-rm: optimiser steps")
    g.add_argument("--rm-batch", type=int, default=16, help="--train-rm: pairs per step")
    g.add_argument("--rm-lr", type=float, default=1e-4, help="--train-rm: peak learning rate")
    g.add_argument("--rm-eval-n", type=int, default=200, help="--train-rm: held-out pairs")

    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--precision", default="auto", help="bf16 (autocast), fp32, or auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the free cores)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the policy (weights, "
                   "gradients, AdamW moments) with FSDP2 instead of a DDP replica per rank; each "
                   "rank samples from a full copy gathered for the rollout")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in backward instead of keeping its activations")
    g.add_argument("--max-tokens", type=int, default=4096, help="tokens per packed row of the update")
    g.add_argument("--gen-rows", type=int, default=128, help="sequences per generate call")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, evaluation, debugging")
    g.add_argument("--save-every", type=int, default=20, help="save training state every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="training states kept")
    g.add_argument("--eval-n", type=int, default=128, help="held-out prompts per task")
    g.add_argument("--eval-batch", type=int, default=64, help="prompts per evaluation batch")
    g.add_argument("--eval-samples", type=int, default=4,
                   help="k of the avg@k held-out reward (k sampled responses per prompt); 0: greedy only")
    g.add_argument("--eval-every", type=int, default=0, help="held-out reward every N steps (a curve)")
    g.add_argument("--debug", action="store_true", help="print a few rollouts with rewards each step")
    g.add_argument("--debug-stop-after", type=int, default=0, help="exit with code 3 after this step")
    return p


def parse_args(argv=None):
    """The command line, with --recipe paper's values (PAPER_RL) as defaults under explicit flags."""
    parser = build_parser()
    recipe, _ = parser.parse_known_args(argv)
    if recipe.recipe == "paper":
        parser.set_defaults(**PAPER_RL)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.all:
        import main_job
        return main_job.run(args.out, args.seed, args.threads)
    compute = training.compute_init(args.device, args.precision)
    training.set_threads(compute, args.threads, "reward model" if args.train_rm else "rl")
    try:
        if args.train_rm:
            existing = training.prepare_run_dir(args.out, args.resume, args.overwrite,
                                                ["reward_model"], compute)
            if existing and args.resume:
                compute.print(f"{args.out}/reward_model exists (--resume): skipping")
                return None
            return reward_model.train(
                check_sft(args.sft), os.path.join(args.out, "reward_model"), compute, args.rm_steps,
                args.rm_batch, args.rm_lr, args.rm_eval_n, args.seed,
                lambda s, n, status: write_progress(args.out, "reward model", s, n, status, compute))
        if args.compare:
            return compare_algorithms(args, compute)
        return run_rl(args, compute)
    finally:
        if compute.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
