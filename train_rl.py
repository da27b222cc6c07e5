"""
train_rl.py — MORL, Mixed On-policy Reinforcement Learning (SPEC.md §6.4; MiMo-VL report §3).

    # the small-scale reproduction, from the stage-4 output of `python train_pretrain.py`
    python train_rl.py --train-rm           # Bradley-Terry reward model -> runs/rl/reward_model
    python train_rl.py                      # MORL (uses the reward model if it exists) -> runs/rl/final
    python train_rl.py --debug --steps 3    # print a few rollouts with their rewards
    python train_rl.py --compare            # on-policy vs vanilla GRPO on text math (report Fig. 7)
    python train_rl.py --algo grpo --updates-per-batch 4 --kl-beta 0.01    # vanilla GRPO + KL
    python train_rl.py --resume             # continue from the last checkpoint in runs/rl
    # the whole reproduction on a fresh machine: pre-training, reward model, MORL, tables, chat (24 min)
    python train_rl.py --all
    # one GPU / several processes: each rank generates its share of the prompts, DDP update
    python train_rl.py --device cuda --sft runs/pretrain-s4/stage4 --steps 200
    torchrun --standalone --nproc_per_node 8 train_rl.py --sft DIR --prompts-per-step 64

One RL run turns the SFT model (the output of pre-training stage 4) into the RL model by
optimising, jointly, verifiable rewards (math answers, counts, boxes, points, OCR, temporal
spans) and the preference score of a Bradley-Terry reward model. Every reward lies in [0, 1];
there is no format reward and no other auxiliary reward.

The update — "a fully on-policy variant of GRPO" (report eq. 1-2), the default `--algo onpolicy`:

    for each prompt q, sample a group of G responses o_1..o_G from the current policy pi_theta
    r_i  = reward router(task of q, o_i, ground truth of q)                     in [0, 1]
    A_i  = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)     sample std (Bessel, G - 1), as verl
    L    = -(1 / sum_i |o_i|) * sum_i sum_t A_i * log pi_theta(o_i,t | q, o_i,<t)

  * token-level normalisation: the sums and the normaliser run over ALL response tokens of the
    rollout batch (every group), not per response (DAPO-style), so long responses are not
    down-weighted token by token;
  * exactly ONE optimiser step per rollout batch: the policy that is updated is the policy that
    sampled, so the importance ratio pi_theta / pi_old is exactly 1 and no clipped surrogate is
    needed. The loss is written as the formula itself, -A * logp; the clipped surrogate at
    ratio exp(logp - logp.detach()) == 1 has the same gradient, A * grad(logp) (tested);
  * no KL term and no reference model.

How it differs from vanilla GRPO (DeepSeekMath), selectable with `--algo grpo` so that the
report's comparison (Fig. 7) can be rerun: vanilla GRPO takes several optimiser steps on each
rollout batch, so from the second step on the data is off-policy; it therefore uses the clipped
surrogate min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) with rho = pi_theta / pi_old
(asymmetric "clip-higher" bounds, eps_low 0.2, eps_high 0.28) and, optionally, a KL penalty
beta * KL(pi_theta || pi_ref) to a frozen reference (the k3 estimator). Both modes here use the
same token-level normalisation (the original GRPO averages per response, then per group), so the
comparison isolates the update rule.

Inherited from MiMo-7B's RL recipe: dynamic sampling (groups whose rewards are all equal have
zero advantage everywhere and carry no gradient: drop them and refill the batch) and the easy
pool (prompts solved by every sample leave the main stream and are re-drawn with probability 0.1).

Rewards run as a service (the report's "Reward-as-a-Service"): a router maps each task tag to a
plain function, and a pool of worker processes scores a rollout batch with a per-item timeout,
so one slow or pathological response never stalls the rollout. No reward ever runs Python's
evaluation of model text: math answers go through the small arithmetic parser of section 2.

One RL step here (section 13): draw this rank's prompts (the synthetic RL tasks of synthetic.py, in
turn, or from the easy pool); sample G responses per prompt with MiMoVL.generate(n=G) (one
prefill and KV cache shared by the group; temperature 1, so the sampled distribution is pi
itself); score them in the reward pool; drop uniform groups and refill; pack every
prompt + response into rows (labels on the response) and recompute log pi by the packed training
forward (MiMoVL.token_logprobs, under DDP through Policy.forward); one AdamW step on the loss
above. Per-task reward, pass rate, response length, truncation rate, entropy and gradient norm
go to the progress bar and to <out>/metrics.jsonl. `python train_rl.py` with no arguments first
scores the SFT model on held-out prompts with real and with black images, trains on the tasks
where the images help (there the groups carry reward signal), and ends with a before/after
table (<out>/summary.md): the held-out reward of greedy answers and avg@k, the mean reward of k
answers sampled at the rollout temperature (the policy's expected reward, which RL maximises). Scale-out: DDP only (no FSDP2: generation needs whole weights).

Outputs (--out, default runs/rl): final/ (the RL model, a Hugging Face folder that
`python mimovl.py --model runs/rl/final` chats with), reward_model/, checkpoints/step-N/,
metrics.jsonl, eval.jsonl (--eval-every), eval_sft.json, summary.md.

Tests: tests/test_rewards.py, tests/test_grpo.py (rewards, pool, loss math), tests/test_rl.py
(the loop through a tiny model: loss by hand, ratio 1, learning, reward model, resume, torchrun).

Sections:
  1. Reading the answer out of a response (think block, size bound, \\boxed{})
  2. A safe arithmetic parser (recursive descent, bounded)
  3. Reward functions
  4. The reward router
  5. The reward pool (Reward-as-a-Service)
  6. GRPO math: group advantages and the policy loss
  7. Sampling: dynamic sampling and the easy pool
  8. Prompts: the RL prompt stream and the held-out sets
  9. Rollouts: G responses per prompt from one prefill, scored by the reward pool
 10. The update: packed rows, log-probs from the training forward, the optimiser step
 11. The Bradley-Terry reward model (--train-rm)
 12. Evaluation: held-out reward per task, the no-image baseline, the before/after table
 13. The RL run
 14. On-policy vs vanilla GRPO (--compare) and the main job (--all)
 15. Command line
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import packing
import synthetic
import train_pretrain as tp
from evaluate import MAX_NEW_TOKENS, evaluate_rewards, has_media, mean_reward, results_table, rl_tag_of, summarise_rewards
import training
from mimovl import MiMoVL
from processor import Processor
from rewards import DATA_REWARDS, RewardPool, passed, register_reward_model, reward_tag


# -----------------------------------------------------------------------------
# 6. GRPO math: group advantages and the policy loss
# -----------------------------------------------------------------------------

def group_advantages(rewards, eps=1e-6):
    """A = (r - mean) / (std + eps) within each group. rewards: (n_groups, G) -> (n_groups, G).

    std is the sample standard deviation (Bessel's correction, divisor G - 1), as in verl's GRPO
    (the framework MiMo-VL trained with) and TRL; the report writes std() without saying which.
    A group whose rewards are all equal gets advantage exactly 0 (set explicitly: r - mean can be
    one rounding step away from 0, and std + eps would not always absorb it).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64 if not torch.is_tensor(rewards) else None)
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must have shape (n_groups, G) with G >= 2, got {tuple(r.shape)}")
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    all_equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(r), (r - mean) / (std + eps))


def policy_loss(logprobs, old_logprobs, advantages, mask, mode="onpolicy", eps_low=0.2,
                eps_high=0.28, kl_beta=0.0, ref_logprobs=None, n_tokens=None):
    """Token-level-normalised policy-gradient loss and its metrics.

    logprobs:      (B, T) log pi_theta of the sampled tokens (with grad)
    old_logprobs:  (B, T) log pi_old from the sampling policy; used by mode "grpo" only (in
                   "onpolicy" it only feeds the `logprob_diff` metric, when given)
    advantages:    (B,) one per response (broadcast over its tokens) or (B, T)
    mask:          (B, T) 1 on response tokens, 0 on prompt and padding
    n_tokens:      the normaliser; default mask.sum(). With micro-batches pass the token count of
                   the whole rollout batch so that the accumulated gradient is the same.

    onpolicy: per-token -A * logp, gradient -A * grad(logp) / N. The importance ratio
              rho = exp(logp - logp.detach()) is exactly 1 and is not needed: the clipped
              surrogate below at rho == 1 has this very gradient (its value is -A, not -A logp).
    grpo:     per-token -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) with
              rho = exp(logp - old_logp).
    kl_beta > 0 (either mode) adds kl_beta * k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1
              (Schulman's unbiased, always >= 0 estimator of KL(pi_theta || pi_ref)).
    Returns (loss, metrics dict of floats).
    """
    if mode not in ("onpolicy", "grpo"):
        raise ValueError(f"mode must be 'onpolicy' or 'grpo', got {mode!r}")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]                                           # (B, 1) -> broadcast
    n = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=logprobs.dtype)
    n_here = mask.sum().clamp(min=1.0)

    def token_mean(x):                     # for metrics: mean over this batch's response tokens
        return float((x.detach() * mask).sum() / n_here)

    metrics = {"n_tokens": float(n)}
    if mode == "onpolicy":
        ratio = torch.ones_like(logprobs)        # pi_theta == pi_old: exactly one update per batch
        per_token = -adv * logprobs
        if old_logprobs is not None:             # rollout engine vs training forward, numerically
            metrics["logprob_diff"] = token_mean((logprobs - old_logprobs).abs())
    else:
        if old_logprobs is None:
            raise ValueError("mode 'grpo' needs old_logprobs (log-probs of the sampling policy)")
        ratio = torch.exp(logprobs - old_logprobs.detach())
        clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        metrics["clip_frac"] = token_mean((ratio * adv > clipped * adv).to(mask.dtype))
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs from the frozen reference model")
        d = ref_logprobs.detach() - logprobs
        kl = torch.exp(d) - d - 1.0                                     # k3 estimator, >= 0
        per_token = per_token + kl_beta * kl
        metrics["kl"] = token_mean(kl)
    metrics["ratio_mean"] = token_mean(ratio)
    loss = (per_token * mask).sum() / n.clamp(min=1.0)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# -----------------------------------------------------------------------------
# 7. Sampling: dynamic sampling and the easy pool
# -----------------------------------------------------------------------------

def _rewards_of(group):
    if isinstance(group, dict):
        return group["rewards"]
    return getattr(group, "rewards", group)


def dynamic_sampling_filter(groups, tol=1e-6):
    """(kept, dropped): drop groups whose rewards are all equal (within tol).

    Such a group has advantage 0 for every response and contributes no gradient, but its tokens
    would still count in the token-level normaliser. A group is a sequence of rewards, a dict
    with "rewards" or an object with a `.rewards` attribute. The caller refills the batch.
    """
    kept, dropped = [], []
    for group in groups:
        rewards = [float(r) for r in _rewards_of(group)]
        (dropped if max(rewards) - min(rewards) <= tol else kept).append(group)
    return kept, dropped


def _default_key(prompt):
    if isinstance(prompt, dict) and "id" in prompt:
        return prompt["id"]
    return json.dumps(prompt, sort_keys=True, default=str)


class EasyPool:
    """MiMo-7B's easy-data re-sampling.

    A prompt whose every sample is solved (all rewards >= solved) leaves the main stream for the
    easy pool; each draw comes from the easy pool with probability `prob` (0.1), otherwise from
    the main stream, skipping prompts that are in the easy pool. An easy prompt that is drawn
    again and no longer solved by every sample returns to the main stream.

        pool = EasyPool(prob=0.1, seed=0)
        prompt, from_easy = pool.draw(stream)      # stream: an iterator of prompts
        pool.update(prompt, rewards)               # after scoring its group
    """

    def __init__(self, prob=0.1, seed=0, solved=1.0, key=_default_key):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"easy-pool probability must be in [0, 1], got {prob!r}")
        self.prob, self.solved, self.key = prob, solved, key
        self.rng = random.Random(seed)
        self.easy = {}                                # key -> prompt (insertion-ordered)

    def __len__(self):
        return len(self.easy)

    def draw(self, stream):
        if self.easy and self.rng.random() < self.prob:
            return self.easy[self.rng.choice(list(self.easy))], True
        for prompt in stream:
            if self.key(prompt) not in self.easy:
                return prompt, False
        raise StopIteration("the prompt stream is exhausted")

    def update(self, prompt, rewards):
        """Record a scored group; returns True if the prompt is (now) in the easy pool."""
        k = self.key(prompt)
        if min(float(r) for r in rewards) >= self.solved:
            self.easy[k] = prompt
            return True
        self.easy.pop(k, None)
        return False


# -----------------------------------------------------------------------------
# 8. Prompts: the RL prompt stream and the held-out sets
# -----------------------------------------------------------------------------
# An RL prompt is a synthetic.py sample without its answer turn: {"task", "messages" (ending with the
# user turn), "answer" (ground truth), "reward" (which reward scores it)} plus an "id" that the
# easy pool and the checkpoints use (prompts hold images, so a checkpoint stores only ids).

def rl_prompt(task, index, split="train", seed=0):
    """Prompt `index` of `task` in `split` (synthetic.rl_prompt) with its id: reproducible from these
    four values alone."""
    return {**synthetic.rl_prompt(task, index, split, seed), "id": f"{split}/{task}/{index}"}


def prompt_from_id(prompt_id, seed=0):
    split, task, index = prompt_id.split("/")
    return rl_prompt(task, int(index), split, seed)


# Pre-training draws its training samples from index 0 upward; RL prompts start far above, so
# the policy is trained on prompts it has never seen (on reused ones, the sampled reward rises
# by memory while the held-out reward does not).
FRESH = 10 ** 9


class PromptStream:
    """This rank's endless stream of training prompts: global position k holds task
    tasks[k % n] (the tasks in turn, so every batch mixes them evenly), index k // n; rank r
    reads positions r, r + world, r + 2 world, ... `position` (per rank) is all a resume needs."""

    def __init__(self, tasks, seed=0, rank=0, world_size=1, position=0):
        if not tasks:
            raise ValueError("no RL tasks to train on")
        self.tasks, self.seed, self.rank, self.world_size = list(tasks), seed, rank, world_size
        self.position = position

    def __iter__(self):
        return self

    def __next__(self):
        k = self.position * self.world_size + self.rank
        self.position += 1
        return rl_prompt(self.tasks[k % len(self.tasks)], FRESH + k // len(self.tasks), "train",
                         self.seed)


def heldout_prompts(tasks, n, seed=0, first=0):
    """n held-out prompts per task, indices first..first+n-1 of data's held-out split (never
    seen in training). The before/after table uses the first n; choosing the tasks to train
    uses the next n, so that the choice does not favour tasks the SFT model got lucky on."""
    return [rl_prompt(task, i, "heldout", seed) for task in tasks for i in range(first, first + n)]


# -----------------------------------------------------------------------------
# 9. Rollouts: G responses per prompt from one prefill, scored by the reward pool
# -----------------------------------------------------------------------------

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
               "second_per_grid_ts")


@dataclass
class Response:
    ids: list               # response token ids, ending with the stop token if the model stopped
    logprobs: list          # log pi_old(id) of each, as the sampler computed them
    text: str               # decoded, without the stop token
    truncated: bool         # ran into max_new_tokens before a stop token
    reward: float = 0.0
    components: dict = field(default_factory=dict)
    trainable: bool = True  # False: a stand-in for an empty response (nothing to learn from)


@dataclass
class Group:
    """One prompt and its G responses: the unit of the advantage (and of dynamic sampling)."""
    prompt: dict
    encoded: dict           # the prompt's input_ids (L,) and vision tensors (encode_prompt)
    responses: list
    from_easy: bool = False
    padding: bool = False   # kept only so that every rank joins every update: no token counts

    @property
    def rewards(self):
        return [r.reward for r in self.responses]

    @property
    def task(self):
        return self.prompt["task"]


def encode_prompt(processor, prompt):
    """Chat template + placeholder expansion + pixels of one prompt, ready for generation."""
    enc = processor([prompt["messages"]])
    return {"input_ids": enc["input_ids"][0], **{k: enc[k] for k in VISION_KEYS if k in enc}}


def collate_prompts(encoded, pad_id):
    """Left-pad encoded prompts into one generation batch (B, L) (prompts end together, where
    generation starts); vision tensors are concatenated in prompt order."""
    length = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, length - len(e["input_ids"]):] = e["input_ids"]
        mask[b, length - len(e["input_ids"]):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for k in VISION_KEYS:
        parts = [e[k] for e in encoded if k in e]
        if parts:
            out[k] = torch.cat(parts)
    return out


def response_budget(task, max_new_tokens=None):
    """Tokens a response may have: --max-new-tokens, else the evaluation's budget of the task."""
    return max_new_tokens or MAX_NEW_TOKENS.get(task, 64)


@torch.no_grad()
def sample_groups(model, processor, prompts, group_size, temperature=1.0, top_p=1.0,
                  max_new_tokens=None, seed=0, max_rows=128, autocast=None):
    """Sample `group_size` responses for every prompt with model.generate(n=G): the G samples of
    a prompt share one prefill and its KV cache. Prompts are generated task by task (each task
    has its own response budget) in calls of at most max_rows // G prompts. -> [Group].
    The RL run samples in the weights' dtype (autocast=None: fp32 master weights here), so the
    sampled distribution is the policy's own; only the update uses the precision policy."""
    model.eval()
    encoded = [encode_prompt(processor, p) for p in prompts]
    by_task = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(p["task"], []).append(i)
    per_call = max(1, max_rows // group_size)
    stops = set(processor.eos_token_ids)
    # a sampled image/video placeholder cannot be fed back to the training forward (it would
    # claim pixels that do not exist): the response ends before it, counted as truncated
    placeholders = {processor.image_token_id, processor.video_token_id}
    groups, call = [None] * len(prompts), 0
    for task, idx in by_task.items():
        for a in range(0, len(idx), per_call):
            chunk = idx[a:a + per_call]
            batch = {k: v.to(model.device)
                     for k, v in collate_prompts([encoded[i] for i in chunk],
                                                 processor.pad_token_id).items()}
            with autocast or contextlib.nullcontext():
                tokens, logprobs = model.generate(
                    **batch, max_new_tokens=response_budget(task, max_new_tokens),
                    temperature=temperature, top_p=top_p, seed=seed * 7919 + call,
                    stop_token_ids=processor.eos_token_ids, n=group_size, return_logprobs=True)
            call += 1
            tokens, logprobs = tokens.cpu().tolist(), logprobs.float().cpu().tolist()
            for j, i in enumerate(chunk):
                responses = []
                for row in range(j * group_size, (j + 1) * group_size):
                    ids, lps = tokens[row], logprobs[row]
                    end = next((t for t, x in enumerate(ids) if x in stops or x in placeholders),
                               len(ids))
                    stopped = end < len(ids) and ids[end] in stops
                    n = end + 1 if stopped else end                      # keep the stop token
                    text = processor.decode(ids[:end], skip_special_tokens=True)
                    if n == 0:       # a placeholder came first: a one-token stand-in, not trained
                        responses.append(Response([processor.eos_token_id], [0.0], "", True,
                                                  trainable=False))
                    else:
                        responses.append(Response(ids[:n], lps[:n], text, not stopped))
                groups[i] = Group(prompts[i], encoded[i], responses)
    return groups


def score_groups(groups, pool):
    """Fill every response's reward and components through the reward pool (Reward-as-a-Service).
    Rewards scored in this process (the reward model) also get the prompt, to judge against."""
    items = []
    for g in groups:
        tag = reward_tag(g.prompt)
        meta = {"messages": g.prompt["messages"]} if tag in pool.inline_tasks else {}
        items += [(tag, r.text, g.prompt["answer"], meta) for r in g.responses]
    results = iter(pool.score(items))
    for g in groups:
        for r in g.responses:
            r.reward, r.components = next(results)
    return groups


@dataclass
class RLConfig:
    """The knobs of the rollout and the update (the command line fills them)."""
    algo: str = "onpolicy"          # "onpolicy" (MiMo-VL) or "grpo" (vanilla, clipped)
    group_size: int = 8             # G responses per prompt
    prompts_per_rank: int = 8       # groups per rollout batch on each rank
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = None      # None: each task's evaluation budget
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


def collect_groups(model, processor, stream, easy_pool, pool, cfg, seed=0, autocast=None):
    """This rank's groups for one rollout batch -> (kept, sampled).

    Prompts come from the stream or, with probability easy_pool.prob, from the easy pool. With
    dynamic sampling, groups whose rewards are all equal (zero advantage: no gradient) are
    dropped and new prompts are drawn, at most cfg.max_refills more times. `sampled` is every
    group scored (the metrics describe what the policy does, not only what is kept). If fewer
    than cfg.updates_per_batch groups survive, dropped groups are added as padding (no token
    counts), so that every rank joins every (DDP) update."""
    kept, dropped, sampled = [], [], []
    rounds = 1 + (cfg.max_refills if cfg.dynamic_sampling else 0)
    for attempt in range(rounds):
        need = cfg.prompts_per_rank - len(kept)
        if need <= 0:
            break
        draws = [easy_pool.draw(stream) for _ in range(need)]
        groups = sample_groups(model, processor, [p for p, _ in draws], cfg.group_size,
                               cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                               seed * 31 + attempt, cfg.max_rows, autocast)
        score_groups(groups, pool)
        for g, (_, from_easy) in zip(groups, draws):
            g.from_easy = from_easy
            easy_pool.update(g.prompt, g.rewards)
        sampled += groups
        if cfg.dynamic_sampling:
            k, d = dynamic_sampling_filter(groups)
            kept, dropped = kept + k, dropped + d
        else:
            kept += groups
    while len(kept) < cfg.updates_per_batch:
        g = dropped.pop()
        g.padding = True
        kept.append(g)
    return kept, sampled


# -----------------------------------------------------------------------------
# 10. The update: packed rows, log-probs from the training forward, the optimiser step
# -----------------------------------------------------------------------------

class Policy(MiMoVL):
    """MiMoVL whose forward() can also return per-token log-probs (MiMoVL.token_logprobs).
    DDP hooks its gradient all-reduce into forward(), so the RL update has to go through it."""

    def forward(self, input_ids, labels=None, token_logprobs=False, with_entropy=False, **inputs):
        if token_logprobs:
            return self.token_logprobs(input_ids, labels, with_entropy=with_entropy, **inputs)
        return super().forward(input_ids, labels=labels, **inputs)


def pack_rows(groups, advantages, max_tokens=4096, processor=None):
    """Rows of the update: each response as its own document `prompt + response` (labels on the
    response tokens, including the stop token) packed with others of the same task into (1, T)
    rows with cu_seqlens (packing.best_fit_pack / collate_packed), as in pre-training. Besides the
    packing keys each row has, aligned with input_ids: `adv` (the response's advantage on its
    tokens), `old` (the sampler's log-probs) and `mask` (tokens that count: the responses of
    non-padding groups). Rows are ordered by task. With `processor` (DDP) a row without pixels
    gets a dummy image (train_pretrain.add_dummy_vision) so every ViT parameter gets a gradient."""
    by_task = {}
    for g, adv in zip(groups, advantages):
        p = g.encoded["input_ids"]
        vision = {k: g.encoded[k] for k in VISION_KEYS if k in g.encoded}
        for r, a in zip(g.responses, adv.tolist()):
            ids = torch.cat([p, torch.tensor(r.ids, dtype=p.dtype)])
            labels = torch.full_like(ids, packing.IGNORE_INDEX)
            labels[len(p):] = ids[len(p):]
            seq = {"input_ids": ids, "labels": labels, "task": g.task, **vision,
                   "adv": torch.zeros(len(ids)), "old": torch.zeros(len(ids)),
                   "mask": torch.zeros(len(ids))}
            seq["adv"][len(p):] = a
            seq["old"][len(p):] = torch.tensor(r.logprobs)
            seq["mask"][len(p):] = 0.0 if g.padding or not r.trainable else 1.0
            by_task.setdefault(g.task, []).append(seq)
    rows = []
    for task, seqs in by_task.items():
        lengths = [len(s["input_ids"]) for s in seqs]
        for idx in packing.best_fit_pack(lengths, max(max_tokens, max(lengths))):
            part = [seqs[i] for i in idx]
            row = packing.collate_packed(part)
            for k in ("adv", "old", "mask"):
                row[k] = torch.cat([s[k] for s in part])[None]
            if processor is not None:
                n = row["input_ids"].shape[1]
                row = tp.add_dummy_vision(row, processor)
                extra = row["input_ids"].shape[1] - n
                for k in ("adv", "old", "mask"):
                    row[k] = torch.cat([row[k], torch.zeros(1, extra)], dim=1)
            row["task"] = task
            rows.append(row)
    return rows


def row_logprobs(model, row, device, with_entropy=False):
    """log pi of the row's labelled tokens (1, T) [and their entropies] by the packed training
    forward (Policy.forward -> MiMoVL.token_logprobs)."""
    return model(row["input_ids"].to(device), labels=row["labels"].to(device), token_logprobs=True,
                 with_entropy=with_entropy, cu_seqlens=row["cu_seqlens"].to(device),
                 **packing.vision_inputs(row, device))


def _all_reduce(values, compute):
    t = torch.tensor(values, dtype=torch.float64)
    if compute.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _gradient_since(params, snapshot):
    """(squared norm of the gradient accumulated since `snapshot`, a new snapshot): one task's
    contribution to the batch gradient, for the per-task gradient norm (single process only)."""
    sq, now = 0.0, []
    for j, p in enumerate(params):
        g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        sq += float((g - snapshot[j] if snapshot is not None else g).float().pow(2).sum())
        now.append(g.clone())
    return sq, now


def policy_update(wrapped, optimizer, groups, cfg, compute, processor=None, ref_model=None):
    """One rollout batch -> cfg.updates_per_batch optimiser steps (on-policy: exactly one).

    Advantages within each group; the batch (this rank's groups) is split into the updates'
    mini-batches; every mini-batch's loss is normalised by its number of response tokens over
    all ranks (token-level normalisation), so micro-batching and ranks do not change the
    gradient. vanilla GRPO needs pi_old: the training forward's log-probs before the first step
    (the sampler's own log-probs differ by numerics: KV cache, batching); the on-policy update
    only logs how far the sampler's log-probs are from the training forward's.
    Returns a dict of metrics (per task: entropy, grad_norm)."""
    model = training.unwrap(wrapped)
    device = compute.device
    model.train()
    adv = group_advantages([g.rewards for g in groups]).float()              # (n_groups, G)
    chunks = [list(c) for c in np.array_split(np.arange(len(groups)), cfg.updates_per_batch)]
    minibatches = [pack_rows([groups[i] for i in c], adv[c], cfg.max_tokens,
                             processor if compute.distributed else None) for c in chunks]
    if cfg.algo == "grpo" or cfg.kl_beta > 0:
        with torch.no_grad(), compute.autocast():
            for rows in minibatches:
                for row in rows:
                    if cfg.algo == "grpo":
                        row["old"] = row_logprobs(model, row, device).float().cpu()
                    if cfg.kl_beta > 0:
                        row["ref"] = row_logprobs(ref_model, row, device).float().cpu()

    params = [p for p in wrapped.parameters() if p.requires_grad]
    per_task_norms = not compute.distributed       # a rank's own gradients are only its share
    sums = {}                                      # metric -> summed over tokens (first update)
    task_sums = {}                                 # task -> [entropy sum, tokens, grad_norm^2]
    step_metrics = []
    for u, rows in enumerate(minibatches):
        n_local = sum(float(r["mask"].sum()) for r in rows)
        (n_total,) = _all_reduce([n_local], compute)
        if n_total == 0:                           # nothing to learn from on any rank
            continue
        # DDP averages gradients over ranks: scale so the sum over ranks / n_total is the loss
        n_norm = n_total / compute.world_size
        snapshot = None
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            with training.grad_sync(wrapped, last), compute.autocast():
                lp, ent = row_logprobs(wrapped, row, device, with_entropy=True)
                lp = lp.float()
                mask = row["mask"].to(device)
                loss, m = policy_loss(lp, row["old"].to(device), row["adv"].to(device), mask,
                                      cfg.algo, cfg.eps_low, cfg.eps_high, cfg.kl_beta,
                                      row["ref"].to(device) if "ref" in row else None,
                                      n_tokens=n_norm)
                loss.backward()
            n_row = float(mask.sum())
            for k in ("ratio_mean", "clip_frac", "kl", "logprob_diff"):
                if k in m:
                    sums[(u, k)] = sums.get((u, k), 0.0) + m[k] * n_row
            sums[(u, "loss")] = sums.get((u, "loss"), 0.0) + m["loss"] * n_norm
            if u == 0:
                t = task_sums.setdefault(row["task"], [0.0, 0.0, 0.0])
                t[0] += float((ent.detach().float() * mask).sum())
                t[1] += n_row
            if per_task_norms and u == 0 and (last or rows[i + 1]["task"] != row["task"]):
                sq, snapshot = _gradient_since(params, snapshot)     # rows are ordered by task
                task_sums[row["task"]][2] += sq
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not math.isfinite(float(norm)):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the gradient norm is {float(norm)}: the update is skipped "
                                     "and training stops; lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        keys = sorted({k for uu, k in sums if uu == u})
        reduced = _all_reduce([sums[(u, k)] for k in keys], compute)
        step_metrics.append({"grad_norm": float(norm),
                             **{k: v / n_total for k, v in zip(keys, reduced)}})

    out = {"updates": len(step_metrics), "tasks": {}}
    if step_metrics:
        out.update({k: v for k, v in step_metrics[0].items()})          # the first update
        if len(step_metrics) > 1:                                       # vanilla: the last one
            out.update({f"last_{k}": v for k, v in step_metrics[-1].items()})
    for task, (ent_sum, n, sq) in task_sums.items():
        out["tasks"][task] = {"entropy": ent_sum / max(n, 1)}
        if per_task_norms:
            out["tasks"][task]["grad_norm"] = math.sqrt(sq)
    return out


# -----------------------------------------------------------------------------
# 11. The Bradley-Terry reward model (train_rl.py --train-rm)
# -----------------------------------------------------------------------------
# The report trains two BT reward models, text-only and multimodal (on MiMo-VL-7B). Here: one,
# the SFT model's backbone with a scalar head on the final hidden state of the last token,
# trained on synthetic.py's preference pairs (a prompt, a chosen and a rejected response) with
#     L = -log sigmoid(r(prompt, chosen) - r(prompt, rejected)),
# then queried through the reward router ("preference" task) with score sigmoid(r) in [0, 1].

class RewardModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.text.hidden_size, 1)
        nn.init.zeros_(self.head.weight)            # every response starts at score 0
        nn.init.zeros_(self.head.bias)
        if not backbone.cfg.text.tie_word_embeddings:
            backbone.lm_head.weight.requires_grad_(False)   # unused (DDP needs every used param)

    def forward(self, input_ids, attention_mask=None, **vision):
        """(B, L) left-padded conversations (+ pixels) -> (B,) Bradley-Terry logits."""
        x, pos, cu, _, _ = self.backbone.embed(input_ids, attention_mask, **vision)
        h = self.backbone.model(x, pos, cu)                           # (T, D), packed
        last = h[cu[1:].long() - 1]                                   # (B, D) last token of each
        return self.head(last).squeeze(-1).float()


def pair_batch(pairs, processor):
    """Preference pairs -> one batch of 2B conversations: the chosen ones, then the rejected."""
    convs = [p["messages"] + [{"role": "assistant", "content": p[k]}]
             for k in ("chosen", "rejected") for p in pairs]
    return processor(convs, add_generation_prompt=False)


@torch.no_grad()
def reward_model_accuracy(rm, processor, pairs, compute, batch_size=32):
    """Fraction of pairs with r(chosen) > r(rejected) (a tie counts half), overall and per
    source task."""
    rm.eval()
    right = {}
    for a in range(0, len(pairs), batch_size):
        part = pairs[a:a + batch_size]
        batch = {k: v.to(compute.device) for k, v in pair_batch(part, processor).items()}
        with compute.autocast():
            s = rm(**batch)
        margin = s[:len(part)] - s[len(part):]
        for p, m in zip(part, margin.tolist()):
            right.setdefault(p.get("source_task", "all"), []).append(float(m > 0) + 0.5 * (m == 0))
    every = sum(right.values(), [])
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(right.items())}}


def load_reward_model(path, device="cpu"):
    """A reward model folder (--train-rm's output) -> (RewardModel in eval mode, record)."""
    from safetensors.torch import load_file
    head_file = os.path.join(path, "extra.safetensors")
    if not os.path.isfile(head_file):
        raise FileNotFoundError(f"{path} is not a reward model folder (no extra.safetensors with "
                                "the scalar head); train one with `python train_rl.py --train-rm`")
    rm = RewardModel(MiMoVL.from_pretrained(path, dtype=torch.float32, progress=False))
    rm.head.load_state_dict({k[len("head."):]: v for k, v in load_file(head_file).items()})
    with open(os.path.join(path, "pretrain_stage.json")) as f:
        record = json.load(f)
    return rm.to(device).eval(), record


def reward_model_scorer(rm, processor, compute):
    """The router's "preference" reward: sigmoid of the BT logit of (prompt, response)."""
    @torch.no_grad()
    def score(response, ground_truth, messages=None, **meta):
        if messages is None:
            raise ValueError("the reward model needs the prompt: pass meta {'messages': ...}")
        batch = processor([list(messages) + [{"role": "assistant", "content": response}]],
                          add_generation_prompt=False)
        with compute.autocast():
            logit = float(rm(**{k: v.to(compute.device) for k, v in batch.items()})[0])
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))), {"rm_logit": logit}
    return score


def fit_reward_model(wrapped, optimizer, processor, pairs_at, schedule, compute, desc="reward model"):
    """Bradley-Terry training: for step in range(schedule["steps"]), this rank's pairs_at(step) (a
    list of {"messages", "chosen", "rejected"}), loss -log sigmoid(r_chosen - r_rejected), clipped
    AdamW step with the warm-up + cosine schedule (training.lr_at(step, **schedule))."""
    from tqdm import tqdm
    rm = training.unwrap(wrapped)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    bar = tqdm(range(schedule["steps"]), desc=desc, disable=not compute.master, dynamic_ncols=True,
               mininterval=2, file=sys.stdout)
    for step in bar:
        rm.train()
        pairs = pairs_at(step)
        for g in optimizer.param_groups:
            g["lr"] = training.lr_at(step, **schedule)
        batch = {k: v.to(compute.device) for k, v in pair_batch(pairs, processor).items()}
        with compute.autocast():
            s = wrapped(**batch)
        margin = s[:len(pairs)] - s[len(pairs):]
        loss = -F.logsigmoid(margin).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix_str(f"loss {loss.item():.3f} acc {(margin > 0).float().mean().item():.2f} "
                            f"gn {float(norm):.2f}")
    bar.close()


def save_reward_model(path, wrapped, processor, record, compute):
    """The backbone as a Hugging Face folder + the head in extra.safetensors (all ranks call)."""
    state = training.full_state(wrapped)
    if compute.master:
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k: v for k, v in state.items() if k.startswith("head.")}
        training.save_stage_folder(path, backbone, training.unwrap(wrapped).backbone.cfg, processor, record,
                             extra=head)
    compute.barrier()


def train_reward_model(args, compute):
    """--train-rm: fine-tune the SFT model into a BT reward model; writes <out>/reward_model."""
    sft = check_sft(args.sft)
    processor = Processor.from_pretrained(sft)
    torch.manual_seed(args.seed)
    rm = RewardModel(MiMoVL.from_pretrained(sft, dtype=torch.float32, progress=False))
    rm.to(compute.device)
    wrapped = training.wrap_model(rm, compute)
    schedule = dict(lr=args.rm_lr, min_lr=args.rm_lr / 10, warmup=max(1, args.rm_steps // 10),
                    steps=args.rm_steps)
    opt = training.build_optimizer(wrapped, args.rm_lr, 0.0, (0.9, 0.95), compute.device)
    heldout = [synthetic.make_sample("preference", i, "heldout", args.seed)
               for i in range(compute.rank, args.rm_eval_n, compute.world_size)]

    def accuracy():
        acc = reward_model_accuracy(rm, processor, heldout, compute)
        keys = sorted(acc)
        vals = _all_reduce([acc[k] * len(heldout) for k in keys] + [len(heldout)], compute)
        return {k: v / vals[-1] for k, v in zip(keys, vals[:-1])}

    t0 = time.perf_counter()
    before = accuracy()
    compute.print(f"reward model: held-out pair accuracy before training {before['accuracy']:.3f} "
                  f"(chance 0.5; {args.rm_eval_n} pairs)")
    per_rank = max(1, args.rm_batch // compute.world_size)

    def pairs_at(step):
        first = (step * compute.world_size + compute.rank) * per_rank
        return [synthetic.make_sample("preference", i, "train", args.seed)
                for i in range(first, first + per_rank)]

    fit_reward_model(wrapped, opt, processor, pairs_at, schedule, compute)
    after = accuracy()
    record = {"stage": "reward_model", "started_from": sft, "steps": args.rm_steps,
              "heldout_pairs": args.rm_eval_n, "before": before, "after": after,
              "minutes": round((time.perf_counter() - t0) / 60, 2)}
    path = os.path.join(args.out, "reward_model")
    save_reward_model(path, wrapped, processor, record, compute)
    lines = ["| held-out preference pairs | before | after |", "|---|---|---|"]
    for k in sorted(after):
        lines.append(f"| {k.replace('accuracy_', '').replace('accuracy', 'all')} | "
                     f"{before.get(k, float('nan')):.3f} | {after[k]:.3f} |")
    compute.print("reward model: pair accuracy (r(chosen) > r(rejected)) on held-out pairs\n"
                  + "\n".join(lines) + f"\nwrote {path} ({record['minutes']} min)")
    return record


# -----------------------------------------------------------------------------
# 12. Evaluation: held-out reward per task, the no-image baseline, the before/after table
# -----------------------------------------------------------------------------


def evaluate_sampled(model, processor, prompts, compute, pool, k, temperature=1.0, top_p=1.0,
                     seed=0, max_rows=128):
    """avg@k: the mean reward of k responses sampled per held-out prompt at the rollout
    temperature -> {task: {reward, pass, length, n}}. This is the policy's expected reward, the
    quantity RL maximises (the report's Fig. 7 plots avg@32); greedy answers can move
    differently, so the before/after table shows both. The seed is fixed, so the SFT and RL
    models are scored on the same prompts with the same random stream."""
    mine = prompts[compute.rank::compute.world_size]
    groups = sample_groups(model, processor, mine, k, temperature, top_p, seed=seed + 17 * compute.rank,
                           max_rows=max_rows) if mine else []
    score_groups(groups, pool)
    records = [{"task": g.task, "reward": r.reward, "pass": float(passed(reward_tag(g.prompt), r.reward)),
                "length": len(r.ids)} for g in groups for r in g.responses]
    return summarise_rewards(sum(training.gather_objects(records, compute), []))


def select_tasks(sft, blank, min_gain=0.1):
    """The tasks RL can improve: those where the SFT model's held-out reward beats its own
    reward with black images by more than min_gain (it uses the image, so its groups carry
    reward signal). Text-only tasks have no such baseline and are trained only when named
    with --tasks. Returns (tasks, {task: why})."""
    tasks, why = [], {}
    for task, m in sft.items():
        if task not in blank:
            why[task] = f"text only (name it with --tasks to train it), SFT {m['reward']:.3f}"
            continue
        why[task] = f"SFT {m['reward']:.3f} vs no-image {blank[task]['reward']:.3f}"
        if m["reward"] > blank[task]["reward"] + min_gain:
            tasks.append(task)
    return tasks, why


# -----------------------------------------------------------------------------
# 13. The RL run
# -----------------------------------------------------------------------------

def default_sft():
    return os.path.join(tp.build_parser().get_default("out"), "stage4")


def check_sft(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"no SFT model at {path}: RL starts from the stage-4 output of "
                         "pre-training. Run `python train_pretrain.py` first (it writes "
                         f"{default_sft()}), or pass --sft DIR.")
    return path


def rl_config(args, compute):
    per_rank = args.prompts_per_step // compute.world_size
    if per_rank * compute.world_size != args.prompts_per_step:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the "
                         f"number of processes ({compute.world_size})")
    updates = args.updates_per_batch or (1 if args.algo == "onpolicy" else 4)
    try:
        return RLConfig(args.algo, args.group_size, per_rank, args.temperature, args.top_p,
                        args.max_new_tokens, updates, args.eps_low, args.eps_high, args.kl_beta,
                        not args.no_dynamic_sampling, args.max_refills, args.max_tokens,
                        args.gen_rows, args.grad_clip).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def step_records(groups):
    return [{"task": g.task, "reward": r.reward, "pass": float(passed(reward_tag(g.prompt), r.reward)),
             "length": len(r.ids), "truncated": float(r.truncated)}
            for g in groups for r in g.responses]


def step_metrics(records):
    out = {}
    for task, m in summarise_rewards(records).items():
        rs = [r for r in records if r["task"] == task]
        out[task] = {**m, "truncated": sum(r["truncated"] for r in rs) / len(rs)}
    return out


def progress_line(rec, per_task):
    """The progress bar's summary of a step: mean and per-task reward, then pass rate, response
    length, truncation rate, mean entropy, gradient norm and kept/sampled groups."""
    short = {t: t if len(t) <= 6 else "".join(w[:3] for w in t.split("_")) for t in per_task}
    tasks = " ".join(f"{short[t]} {m['reward']:.2f}" for t, m in sorted(per_task.items()))
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


def _log(path, record, compute):
    if compute.master:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def setup_rewards(args, compute, processor, tasks):
    """The reward pool, and the reward model when one is available (--rm): registered for the
    "preference" task. Tasks scored by a missing reward model are dropped, with a note."""
    pool = RewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout)
    rm_path = args.rm
    if rm_path == "auto":
        rm_path = os.path.join(args.out, "reward_model")
        rm_path = rm_path if os.path.isfile(os.path.join(rm_path, "extra.safetensors")) else None
    elif rm_path == "none":
        rm_path = None
    if rm_path:
        rm, record = load_reward_model(rm_path, compute.device)
        register_reward_model(reward_model_scorer(rm, processor, compute))
        acc = record.get("after", {}).get("accuracy", float("nan"))
        compute.print(f"reward model: {rm_path} (held-out pair accuracy {acc:.3f}) scores the "
                      "open-ended tasks")
    else:
        register_reward_model(None)
        rm_tasks = [t for t in tasks if DATA_REWARDS.get(rl_tag_of(t)) == "preference"]
        if rm_tasks:
            compute.print(f"no reward model ({os.path.join(args.out, 'reward_model')} not found): "
                          f"skipping {', '.join(rm_tasks)}; train one with `python train_rl.py "
                          "--train-rm` for the full MORL mix")
            tasks = [t for t in tasks if t not in rm_tasks]
    return pool, tasks


def baseline_eval(args, compute, processor, pool, eval_tasks, path):
    """The SFT model's held-out rewards with real and with black images, on the prompts of the
    before/after table and (--tasks auto) on the separate prompts that choose the tasks. Cached
    in `path` (a rerun or --resume reuses it)."""
    key = {"sft": os.path.abspath(args.sft), "tasks": eval_tasks, "n": args.eval_n,
           "seed": args.seed, "rm": args.rm, "select": args.tasks == "auto",
           "samples": args.eval_samples, "temperature": args.temperature, "top_p": args.top_p}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    model = MiMoVL.from_pretrained(args.sft, dtype=torch.float32, device=compute.device,
                                   progress=False).eval()
    t0 = time.perf_counter()
    res = {"key": key}
    sets = [("", 0)] + ([("select_", args.eval_n)] if key["select"] else [])
    for prefix, first in sets:
        prompts = heldout_prompts(eval_tasks, args.eval_n, args.seed, first)
        res[prefix + "sft"], _ = evaluate_rewards(model, processor, prompts, compute, pool,
                                                  args.eval_batch)
        res[prefix + "blank"], _ = evaluate_rewards(model, processor, prompts, compute, pool,
                                                    args.eval_batch, blank=True)
    if args.eval_samples:
        res["sft_sampled"] = evaluate_sampled(
            model, processor, heldout_prompts(eval_tasks, args.eval_n, args.seed), compute, pool,
            args.eval_samples, args.temperature, args.top_p, args.seed, args.gen_rows)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if compute.master:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    del model
    return res


def run_rl(args, compute):
    """The MORL run: SFT baseline -> RL steps -> final folder -> before/after table."""
    from tqdm import tqdm
    check_sft(args.sft)
    os.makedirs(args.out, exist_ok=True)
    final = os.path.join(args.out, "final")
    if args.resume and os.path.isfile(os.path.join(final, "rl.json")):
        with open(os.path.join(final, "rl.json")) as f:
            done = json.load(f)
        compute.print(f"{final} is finished (--resume): nothing to do\n\n{done['table']}")
        return done
    t_start = time.perf_counter()
    processor = Processor.from_pretrained(args.sft)
    all_tasks = list(synthetic.RL_TASKS) if args.tasks == "auto" else args.tasks.split(",")
    for t in all_tasks:
        if t not in synthetic.TASKS:
            raise SystemExit(f"--tasks: unknown task {t!r}; RL tasks are {', '.join(synthetic.RL_TASKS)}")
    pool, eval_tasks = setup_rewards(args, compute, processor, all_tasks)
    try:
        return _run_rl(args, compute, processor, pool, eval_tasks, final, t_start, tqdm)
    finally:
        pool.close()


def _run_rl(args, compute, processor, pool, eval_tasks, final, t_start, tqdm):
    base = baseline_eval(args, compute, processor, pool, eval_tasks,
                         os.path.join(args.out, "eval_sft.json"))
    if args.tasks == "auto":
        tasks, why = select_tasks(base["select_sft"], base["select_blank"], args.min_gain)
        compute.print(f"task selection on {args.eval_n} separate held-out prompts per task (RL "
                      "needs reward signal: the SFT model must beat its no-image baseline):\n"
                      + "\n".join(
                          f"  {'train' if t in tasks else 'skip '} {t:<16} {why[t]}" for t in why))
        if not tasks:
            raise SystemExit("no task has reward signal: the SFT model is no better than with "
                             "black images anywhere. Train the SFT model longer "
                             "(train_pretrain.py --scale) or name tasks with --tasks.")
    else:
        tasks = eval_tasks
    cfg = rl_config(args, compute)

    ckpt_root = os.path.join(args.out, "checkpoints")
    resume_from = (training.list_checkpoints(ckpt_root) or [None])[-1] if args.resume else None
    if not args.resume and compute.master:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        for name in ("metrics.jsonl", "eval.jsonl"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    compute.barrier()
    policy = Policy.from_pretrained(resume_from or args.sft, dtype=torch.float32, progress=False)
    tp.set_trainable(policy, tuple(x for x in args.trainable.split("+") if x))
    policy.to(compute.device)
    ref_model = None
    if cfg.kl_beta > 0:
        ref_model = Policy.from_pretrained(args.sft, dtype=torch.float32, device=compute.device,
                                           progress=False).eval().requires_grad_(False)
    wrapped = training.wrap_model(policy, compute)
    opt = training.build_optimizer(wrapped, args.lr, args.weight_decay, (0.9, 0.999), compute.device)
    schedule = dict(lr=args.lr, min_lr=args.lr, warmup=args.warmup, steps=args.steps)
    step, loader = 0, {}
    if resume_from:
        step, loader, ts = training.load_training_state(resume_from, wrapped, opt, compute)
        tasks = ts.get("tasks", tasks)
        compute.print(f"resuming from {resume_from} (step {step})")
    stream = PromptStream(tasks, args.seed, compute.rank, compute.world_size, loader.get("position", 0))
    easy = EasyPool(args.easy_prob, seed=args.seed * 1000 + compute.rank)
    if loader.get("easy") is not None:
        easy.easy = {k: prompt_from_id(k, args.seed) for k in loader["easy"]}
        s = loader["easy_rng"]
        easy.rng.setstate((s[0], tuple(s[1]), s[2]))
    compute.print(f"\n=== MORL ({cfg.algo}{', KL %g' % cfg.kl_beta if cfg.kl_beta else ''}): "
                  f"{args.steps} steps x {args.prompts_per_step} prompts x G={cfg.group_size}, "
                  f"lr {args.lr:g}, {cfg.updates_per_batch} optimiser step(s) per rollout batch; "
                  f"tasks: {', '.join(tasks)}")

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    curve_prompts = heldout_prompts(tasks, args.eval_n, args.seed) if args.eval_every else None
    bar = tqdm(total=args.steps, initial=step, desc="rl", disable=not compute.master,
               dynamic_ncols=True, mininterval=1, file=sys.stdout)
    seen = loader.get("prompts_seen", 0)
    while step < args.steps:
        lr = training.lr_at(step, **schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        kept, sampled = collect_groups(policy, processor, stream, easy, pool, cfg,
                                       seed=args.seed * 1_000_003 + step * 1009 + compute.rank)
        t1 = time.perf_counter()
        upd = policy_update(wrapped, opt, kept, cfg, compute,
                            processor if compute.distributed else None, ref_model)
        t2 = time.perf_counter()
        step += 1
        records = sum(training.gather_objects(step_records(sampled), compute), [])
        counts = _all_reduce([len(sampled), sum(not g.padding for g in kept), len(easy),
                              sum(g.from_easy for g in sampled)], compute)
        seen += int(counts[1]) * cfg.group_size
        per_task = step_metrics(records)
        for task, m in upd.pop("tasks").items():
            per_task.setdefault(task, {}).update(m)
        rec = {"step": step, "lr": lr, "reward": sum(r["reward"] for r in records) / len(records),
               "pass": sum(r["pass"] for r in records) / len(records),
               "length": sum(r["length"] for r in records) / len(records),
               "truncated": sum(r["truncated"] for r in records) / len(records),
               "sampled_groups": int(counts[0]), "kept_groups": int(counts[1]),
               "easy_pool": int(counts[2]), "from_easy": int(counts[3]),
               "responses_trained": seen, **upd, "tasks": per_task,
               "rollout_s": round(t1 - t0, 2), "update_s": round(t2 - t1, 2), "time": time.time()}
        _log(metrics_path, rec, compute)
        bar.update(1)
        bar.set_postfix_str(progress_line(rec, per_task))
        if args.debug:
            print_debug(sampled, compute)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            res, _ = evaluate_rewards(policy, processor, curve_prompts, compute, pool, args.eval_batch)
            res_k = evaluate_sampled(policy, processor, curve_prompts, compute, pool,
                                     args.eval_samples, args.temperature, args.top_p, args.seed,
                                     args.gen_rows) if args.eval_samples else None
            _log(os.path.join(args.out, "eval.jsonl"),
                 {"step": step, "responses_trained": seen, "tasks": res, "sampled": res_k}, compute)
            bar.write(f"step {step}: held-out reward (greedy) " + " ".join(
                f"{t} {m['reward']:.3f}" for t, m in res.items()) + (
                f"; avg@{args.eval_samples} " + " ".join(
                    f"{t} {m['reward']:.3f}" for t, m in res_k.items()) if res_k else ""))
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            state = {"position": stream.position, "easy": list(easy.easy),
                     "easy_rng": easy.rng.getstate(), "prompts_seen": seen}
            training.save_training_state(ckpt_root, step, wrapped, opt, policy.cfg, processor, state,
                                   compute, args.keep_last, {"stage": "rl", "tasks": tasks})
        if args.debug_stop_after and step == args.debug_stop_after:
            bar.close()
            compute.print(f"stopping after step {step} (--debug-stop-after)")
            raise SystemExit(3)
    bar.close()
    train_minutes = (time.perf_counter() - t_start) / 60

    # --- the RL model: folder, held-out rewards, the before/after table ---------------------
    state = training.full_state(wrapped)
    record = {"stage": "rl", "algo": cfg.algo, "steps": args.steps, "tasks": tasks,
              "started_from": os.path.abspath(args.sft), "config": asdict(cfg),
              "args": vars(args)}
    if compute.master:
        training.save_stage_folder(final + ".partial", state, policy.cfg, processor, record)
    compute.barrier()
    prompts = heldout_prompts(eval_tasks, args.eval_n, args.seed)
    after, recs = evaluate_rewards(policy, processor, prompts, compute, pool, args.eval_batch)
    after_sampled = evaluate_sampled(policy, processor, prompts, compute, pool, args.eval_samples,
                                     args.temperature, args.top_p, args.seed, args.gen_rows) \
        if args.eval_samples else None
    table = results_table(base["sft"], after, base["blank"], tasks, base.get("sft_sampled"),
                          after_sampled, args.eval_samples)
    minutes = (time.perf_counter() - t_start) / 60
    done = {"tasks": tasks, "sft": base["sft"], "rl": after, "blank": base["blank"],
            "mean_sft": mean_reward(base["sft"], tasks), "mean_rl": mean_reward(after, tasks),
            "sft_sampled": base.get("sft_sampled"), "rl_sampled": after_sampled,
            "table": table, "minutes": round(minutes, 2), "train_minutes": round(train_minutes, 2),
            "examples": {r["task"]: {"response": r["response"], "answer": r["answer"]}
                         for r in recs}}
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


# -----------------------------------------------------------------------------
# 14. On-policy vs vanilla GRPO (--compare) and the main job (--all)
# -----------------------------------------------------------------------------

def compare_algorithms(args, compute):
    """--compare: the report's Fig. 7 at small scale. The same SFT model, prompts and number of
    rollout batches on the reasoning task, once with the on-policy update (one step per batch)
    and once with vanilla GRPO (--updates-per-batch steps per batch, clipped ratio); held-out
    reward (greedy and avg@k) every --eval-every steps, printed side by side."""
    curves = {}
    for algo in ("onpolicy", "grpo"):
        a = argparse.Namespace(**vars(args))
        a.algo, a.out, a.rm = algo, os.path.join(args.out, algo), "none"
        a.tasks = "text_math" if args.tasks == "auto" else args.tasks
        a.eval_every = args.eval_every or max(1, args.steps // 6)
        run_rl(a, compute)
        with open(os.path.join(a.out, "eval.jsonl")) as f:
            curves[algo] = [json.loads(line) for line in f]
        with open(os.path.join(a.out, "eval_sft.json")) as f:
            sft = json.load(f)
        curves[algo].insert(0, {"step": 0, "responses_trained": 0, "tasks": sft["sft"],
                                "sampled": sft.get("sft_sampled")})
    k = args.eval_samples

    def mean(rec, key):
        res = rec.get(key)
        return f"{mean_reward(res, list(res)):.3f}" if res else "-"
    lines = ["| step | responses trained (on-policy / vanilla) | on-policy greedy | vanilla greedy "
             f"| on-policy avg@{k} | vanilla avg@{k} |", "|---|---|---|---|---|---|"]
    for on, va in zip(curves["onpolicy"], curves["grpo"]):
        lines.append(f"| {on['step']} | {on['responses_trained']} / {va['responses_trained']} | "
                     f"{mean(on, 'tasks')} | {mean(va, 'tasks')} | {mean(on, 'sampled')} | "
                     f"{mean(va, 'sampled')} |")
    table = "\n".join(lines)
    if compute.master:
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table + "\n")
    compute.print("\non-policy (1 step per rollout batch) vs vanilla GRPO (clipped, several steps "
                  f"per batch): mean held-out reward\n{table}")
    return curves


HERE = os.path.dirname(os.path.abspath(__file__))
# (name, seconds measured on 2 free CPU cores, README): the ETA of the main job's progress bar
MAIN_JOB_PHASES = (("pre-training, stages 0-4", 1040), ("reward model", 45), ("MORL", 310),
                   ("chat", 10))


def _child_progress(text, phase):
    """Fraction of a child's work done, read from the last tqdm bar in its output."""
    bars = re.findall(r"(stage [\w-]+|reward model|rl):\s+\d+%\|[^|\n\r]*\|\s*(\d+)/(\d+)", text)
    if not bars:
        return 0.0
    name, n, total = bars[-1]
    if phase == 0 and name.startswith("stage "):      # pre-training: its stages in order
        steps = {k: s.steps for k, s in tp.STAGES.items()}
        key = name[len("stage "):]
        if key in steps:
            before = sum(steps[k] for k in tp.STAGE_ORDER[:tp.STAGE_ORDER.index(key)])
            return (before + int(n)) / sum(steps.values())
    return int(n) / max(int(total), 1)


def _run_phase(cmd, log_path, bar, base, weight, phase):
    """Run one phase as a child process (its output to log_path); move the job's bar as the
    child's own progress bars move."""
    import subprocess
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while child.poll() is None:
            time.sleep(1.0)
            with open(log_path, errors="replace") as f:
                f.seek(max(0, os.path.getsize(log_path) - 20000))
                tail = f.read()
            frac = min(0.99, _child_progress(tail, phase))
            bar.n = min(base + frac * weight, bar.total)
            last = [x for x in re.split(r"[\r\n]", tail) if x.strip()]
            bar.set_postfix_str((last[-1].strip() if last else "")[:70], refresh=False)
            bar.refresh()
    if child.returncode != 0:
        bar.close()
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"\n{tail}\n\nERROR: `{' '.join(cmd)}` failed (exit {child.returncode}); "
                         f"its full output is in {log_path}")


def main_job(args):
    """--all: the whole small-scale reproduction from nothing, with one progress bar and ETA:
    pre-training stages 0-4 -> reward model -> MORL -> evaluation tables -> a chat answer from
    the CLI about a freshly generated synthetic image. Rerunning continues where it stopped."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    pre_out = tp.build_parser().get_default("out")
    sft = os.path.join(pre_out, "stage4")
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    common = ["--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
    cmds = [
        [py, os.path.join(HERE, "train_pretrain.py"), "--out", pre_out, "--resume"] + common,
        [py, os.path.join(HERE, "train_rl.py"), "--train-rm", "--sft", sft, "--out", args.out,
         "--resume"] + common,
        [py, os.path.join(HERE, "train_rl.py"), "--sft", sft, "--out", args.out, "--resume"] + common,
    ]
    total = sum(w for _, w in MAIN_JOB_PHASES)
    print(f"main job: {len(MAIN_JOB_PHASES)} phases, about {total / 60:.0f} min on 2 CPU cores; "
          f"logs in {args.out}/main-*.log", flush=True)
    bar = tqdm(total=total, desc="main job", file=sys.stdout, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    base = 0
    for phase, (cmd, (name, weight)) in enumerate(zip(cmds, MAIN_JOB_PHASES)):
        bar.set_description(f"main job [{phase + 1}/{len(MAIN_JOB_PHASES)} {name}]")
        _run_phase(cmd, os.path.join(args.out, f"main-{phase + 1}.log"), bar, base, weight, phase)
        base += weight
        bar.n = base
        bar.refresh()

    # --- chat: ask the final model about an image it has never seen ---------------------------
    bar.set_description(f"main job [4/4 chat]")
    sample = synthetic.make_sample("count", 7, "heldout", args.seed + 1)
    image_path = os.path.join(args.out, "chat_image.png")
    sample["messages"][0]["content"][0]["image"].save(image_path)
    question = sample["messages"][0]["content"][1]["text"]
    final = os.path.join(args.out, "final")
    cmd = [py, os.path.join(HERE, "mimovl.py"), "--model", final, "--image", image_path,
           "--max-new-tokens", "64", question]
    _run_phase(cmd, os.path.join(args.out, "main-4.log"), bar, base, MAIN_JOB_PHASES[-1][1], 3)
    bar.n = total
    bar.close()
    with open(os.path.join(args.out, "main-4.log")) as f:
        answer = [x for x in f.read().splitlines()[1:] if not x.startswith("loading ")]
    minutes = (time.perf_counter() - t0) / 60

    def read(path):
        return open(path).read().strip() if os.path.isfile(path) else f"({path} missing)"
    print("\n=== pre-training: held-out results after each stage\n" +
          read(os.path.join(pre_out, "summary.md")))
    print("\n=== reward model\n" + read(os.path.join(args.out, "reward_model", "pretrain_stage.json")))
    print("\n=== MORL: held-out reward before and after\n" + read(os.path.join(args.out, "summary.md")))
    print(f"\n=== chat\n$ python mimovl.py --model {final} --image {image_path} \"{question}\"\n"
          + "\n".join(answer) + f"\n(ground truth: {sample['answer']})")
    print(f"\nmain job done in {minutes:.1f} min")
    return minutes


# -----------------------------------------------------------------------------
# 15. Command line
# -----------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="MORL: mixed on-policy RL (SPEC §6.4)",
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
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>")

    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", default="auto", help="comma list of synthetic.RL_TASKS, or auto: the "
                   "tasks where the SFT model beats its no-image baseline")
    g.add_argument("--min-gain", type=float, default=0.1,
                   help="auto: the SFT reward must beat the no-image reward by this much")

    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="onpolicy", choices=("onpolicy", "grpo"),
                   help="onpolicy: MiMo-VL's update (1 optimiser step per batch, no clipping); "
                        "grpo: vanilla (several clipped steps per batch)")
    g.add_argument("--steps", type=int, default=40, help="rollout batches")
    g.add_argument("--prompts-per-step", type=int, default=16, help="groups per batch, all ranks")
    g.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after warm-up)")
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
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="response budget (default: each task's evaluation budget)")
    g.add_argument("--no-dynamic-sampling", action="store_true",
                   help="keep groups whose rewards are all equal")
    g.add_argument("--max-refills", type=int, default=2, help="dynamic sampling: refill rounds")
    g.add_argument("--easy-prob", type=float, default=0.1,
                   help="probability of drawing from the easy pool (prompts solved by every sample)")

    g = p.add_argument_group("rewards")
    g.add_argument("--reward-workers", type=int, default=2, help="reward worker processes (0: inline)")
    g.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per reward")
    g.add_argument("--rm-steps", type=int, default=120, help="--train-rm: optimiser steps")
    g.add_argument("--rm-batch", type=int, default=16, help="--train-rm: pairs per step")
    g.add_argument("--rm-lr", type=float, default=1e-4, help="--train-rm: peak learning rate")
    g.add_argument("--rm-eval-n", type=int, default=200, help="--train-rm: held-out pairs")

    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--precision", default="auto", help="bf16 (autocast), fp32, or auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-tokens", type=int, default=4096, help="tokens per packed row of the update")
    g.add_argument("--gen-rows", type=int, default=128, help="sequences per generate call")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, evaluation, debugging")
    g.add_argument("--save-every", type=int, default=20, help="save training state every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="training states kept")
    g.add_argument("--eval-n", type=int, default=128, help="held-out prompts per task")
    g.add_argument("--eval-batch", type=int, default=64, help="prompts per evaluation batch")
    g.add_argument("--eval-samples", type=int, default=4,
                   help="k of the avg@k held-out reward (k responses per prompt at the rollout "
                        "temperature); 0: greedy only")
    g.add_argument("--eval-every", type=int, default=0, help="held-out reward every N steps (a curve)")
    g.add_argument("--debug", action="store_true", help="print a few rollouts with rewards each step")
    g.add_argument("--debug-stop-after", type=int, default=0, help="exit with code 3 after this step")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.all:
        return main_job(args)
    compute = training.compute_init(args.device, args.precision)
    if compute.device.type == "cpu":
        n, why = training.pick_threads(args.threads)
        torch.set_num_threads(n)
        compute.print(f"torch CPU threads: {n} ({why})")
    try:
        if args.train_rm:
            if args.resume and os.path.isfile(os.path.join(args.out, "reward_model", "extra.safetensors")):
                compute.print(f"{args.out}/reward_model exists (--resume): skipping")
                return None
            return train_reward_model(args, compute)
        if args.compare:
            return compare_algorithms(args, compute)
        return run_rl(args, compute)
    finally:
        if compute.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
