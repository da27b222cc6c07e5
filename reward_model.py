"""
reward_model.py — the Bradley-Terry reward model that scores MORL's open-ended answers (MiMo-VL
technical report, arXiv 2506.03569, §3: "rewards from reward models" beside the verifiable ones).

    python train_rl.py --train-rm          # trains it from the SFT model -> runs/rl/reward_model

The report trains two BT reward models, text-only and multimodal. Here there is one: the SFT
model's backbone with a scalar head on the final hidden state of the last token, trained on
synthetic.py's preference pairs (a prompt, a chosen and a rejected answer) with

    L = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))

and queried by the reward router of rewards.py (task "preference", register_reward_model) with
score sigmoid(r) in [0, 1]. The folder it writes is a Hugging Face folder of the backbone plus
the head in extra.safetensors. Tests: tests/test_rl.py (ranks held-out pairs, save/load, NaN).
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import synthetic
import training
from mimovl import MiMoVL
from processor import Processor


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
        return self.head(h[cu[1:].long() - 1]).squeeze(-1).float()   # last token of each


def pair_batch(pairs, processor):
    """Preference pairs -> one batch of 2B conversations: the chosen ones, then the rejected."""
    convs = [p["messages"] + [{"role": "assistant", "content": p[k]}]
             for k in ("chosen", "rejected") for p in pairs]
    return processor(convs, add_generation_prompt=False)


@torch.no_grad()
def accuracy(rm, processor, pairs, compute, batch_size=32):
    """Fraction of pairs with r(chosen) > r(rejected) (a tie counts half), overall and per
    source task."""
    rm.eval()
    right = {}
    for a in range(0, len(pairs), batch_size):
        part = pairs[a:a + batch_size]
        batch = {k: v.to(compute.device) for k, v in pair_batch(part, processor).items()}
        with compute.autocast():
            s = rm(**batch)
        for p, m in zip(part, (s[:len(part)] - s[len(part):]).tolist()):
            right.setdefault(p.get("source_task", "all"), []).append(float(m > 0) + 0.5 * (m == 0))
    every = sum(right.values(), [])
    return {"accuracy": sum(every) / max(len(every), 1),
            **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(right.items())}}


def fit(wrapped, optimizer, processor, pairs_at, schedule, compute, progress=None):
    """Bradley-Terry training: for step in range(schedule["steps"]), this rank's pairs_at(step)
    ({"messages", "chosen", "rejected"}), loss -log sigmoid(r_chosen - r_rejected), clipped AdamW
    step at training.lr_at(step, **schedule). progress(step, total, status) follows along."""
    from tqdm import tqdm
    params = [p for p in wrapped.parameters() if p.requires_grad]
    bar = tqdm(range(schedule["steps"]), desc="reward model", disable=not compute.master,
               dynamic_ncols=True, mininterval=2, file=sys.stdout)
    for step in bar:
        training.unwrap(wrapped).train()
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
        status = f"loss {loss.item():.3f} acc {(margin > 0).float().mean().item():.2f} gn {float(norm):.2f}"
        bar.set_postfix_str(status)
        if progress:
            progress(step + 1, schedule["steps"], status)
    bar.close()


def save(path, wrapped, processor, record, compute):
    """The backbone as a Hugging Face folder + the head in extra.safetensors (all ranks call)."""
    state = training.full_state(wrapped)
    if compute.master:
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k: v for k, v in state.items() if k.startswith("head.")}
        training.save_stage_folder(path, backbone, training.unwrap(wrapped).backbone.cfg, processor,
                                   record, extra=head)
    compute.barrier()


def load(path, device="cpu"):
    """A reward model folder (save's output) -> (RewardModel in eval mode, its record)."""
    from safetensors.torch import load_file
    head_file = os.path.join(path, "extra.safetensors")
    if not os.path.isfile(head_file):
        training.fail(f"{path} is not a reward model folder (no extra.safetensors with the scalar "
                      "head); train one with `python train_rl.py --train-rm`")
    rm = RewardModel(MiMoVL.from_pretrained(path, dtype=torch.float32, progress=False))
    rm.head.load_state_dict({k[len("head."):]: v for k, v in load_file(head_file).items()})
    with open(os.path.join(path, "pretrain_stage.json")) as f:
        record = json.load(f)
    return rm.to(device).eval(), record


def scorer(rm, processor, compute):
    """The router's "preference" reward: sigmoid of the BT logit of (prompt, response). A
    non-finite logit scores 0 with an error (clamping first would turn NaN into 1.0)."""
    @torch.no_grad()
    def score(response, ground_truth, messages=None, **meta):
        if messages is None:
            raise ValueError("the reward model needs the prompt: pass meta {'messages': ...}")
        batch = processor([list(messages) + [{"role": "assistant", "content": response}]],
                          add_generation_prompt=False)
        with compute.autocast():
            logit = float(rm(**{k: v.to(compute.device) for k, v in batch.items()})[0])
        if not math.isfinite(logit):
            return 0.0, {"rm_logit": logit, "error": f"reward model logit {logit}"}
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))), {"rm_logit": logit}
    return score


def train(sft, path, compute, steps=120, batch=16, lr=1e-4, eval_n=200, seed=0, progress=None):
    """Fine-tune the SFT model in folder `sft` into a BT reward model on synthetic.py's
    preference pairs; held-out pair accuracy before and after; writes the folder `path`."""
    processor = Processor.from_pretrained(sft)
    torch.manual_seed(seed)
    rm = RewardModel(MiMoVL.from_pretrained(sft, dtype=torch.float32, progress=False))
    wrapped = training.wrap_model(rm.to(compute.device), compute)
    schedule = dict(lr=lr, min_lr=lr / 10, warmup=max(1, steps // 10), steps=steps)
    opt = training.build_optimizer(wrapped, lr, 0.0, (0.9, 0.95), compute.device)
    heldout = [synthetic.make_sample("preference", i, "heldout", seed)
               for i in range(compute.rank, eval_n, compute.world_size)]

    def heldout_accuracy():
        acc = accuracy(rm, processor, heldout, compute)
        vals = training.all_reduce_sum(torch.tensor([acc[k] * len(heldout) for k in sorted(acc)]
                                                    + [len(heldout)], dtype=torch.float64), compute)
        return {k: float(v / vals[-1]) for k, v in zip(sorted(acc), vals[:-1])}

    t0 = time.perf_counter()
    before = heldout_accuracy()
    per_rank = max(1, batch // compute.world_size)

    def pairs_at(step):
        first = (step * compute.world_size + compute.rank) * per_rank
        return [synthetic.make_sample("preference", i, "train", seed) for i in range(first, first + per_rank)]

    fit(wrapped, opt, processor, pairs_at, schedule, compute, progress)
    after = heldout_accuracy()
    record = {"stage": "reward_model", "started_from": sft, "steps": steps, "heldout_pairs": eval_n,
              "before": before, "after": after, "minutes": round((time.perf_counter() - t0) / 60, 2)}
    save(path, wrapped, processor, record, compute)
    lines = ["| held-out preference pairs | before | after |", "|---|---|---|"]
    lines += [f"| {k.replace('accuracy_', '').replace('accuracy', 'all')} | "
              f"{before.get(k, float('nan')):.3f} | {after[k]:.3f} |" for k in sorted(after)]
    compute.print(f"reward model: pair accuracy (r(chosen) > r(rejected)) on {eval_n} held-out "
                  "pairs (chance 0.5)\n" + "\n".join(lines) + f"\nwrote {path} ({record['minutes']} min)")
    return record
