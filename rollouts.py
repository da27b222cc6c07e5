"""
rollouts.py — the data side of MORL (train_rl.py): which prompts a rollout batch holds and how their
responses are sampled and scored.

  1. Dynamic sampling and the easy pool (MiMo-7B report, arXiv 2505.07608, §3.3)
  2. Prompts: the RL prompt stream and the held-out sets
  3. Rollouts: G responses per prompt from one prefill (MiMoVL.generate(n=G)), scored by the
     reward pool of rewards.py

train_rl.py's update turns the groups collected here into the GRPO loss.
"""

import random
from dataclasses import dataclass, field

import torch

import synthetic
from rewards import passed, reward_tag

# -----------------------------------------------------------------------------
# 1. Dynamic sampling and the easy pool
# -----------------------------------------------------------------------------

def has_signal(rewards, tol=1e-6):
    """Dynamic sampling keeps a group only if its rewards differ: equal rewards give advantage 0
    everywhere (no gradient), yet their tokens would still count in the normaliser."""
    return max(rewards) - min(rewards) > tol


class EasyPool:
    """MiMo-7B's easy-data re-sampling. A prompt whose every response passes (rewards.passed,
    the pass of the metrics) leaves the main stream for the easy pool; each draw comes from the
    easy pool with probability `prob`, else from the stream, skipping prompts in the pool. An easy
    prompt drawn again and no longer passed by every response returns to the stream.

        prompt, from_easy = pool.draw(stream)      # stream: an iterator of prompts with an "id"
        pool.update(prompt, solved)                # after scoring its group
    """

    def __init__(self, prob=0.1, seed=0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"easy-pool probability must be in [0, 1], got {prob!r}")
        self.prob, self.rng, self.easy = prob, random.Random(seed), {}    # id -> prompt

    def __len__(self):
        return len(self.easy)

    def draw(self, stream):
        if self.easy and self.rng.random() < self.prob:
            return self.easy[self.rng.choice(list(self.easy))], True
        for prompt in stream:
            if prompt["id"] not in self.easy:
                return prompt, False
        raise StopIteration("the prompt stream is exhausted")

    def update(self, prompt, solved):
        if solved:
            self.easy[prompt["id"]] = prompt
        else:
            self.easy.pop(prompt["id"], None)


# -----------------------------------------------------------------------------
# 2. Prompts: the RL prompt stream and the held-out sets
# -----------------------------------------------------------------------------
# An RL prompt is a synthetic.py sample without its answer turn: {"task", "messages" (ending with
# the user turn), "answer", "reward" (which reward scores it)} plus an "id" that the easy pool
# and the checkpoints use (prompts hold images, so a checkpoint stores only ids).

def rl_prompt(task, index, split="train", seed=0):
    return {**synthetic.rl_prompt(task, index, split, seed), "id": f"{split}/{task}/{index}"}


def prompt_from_id(prompt_id, seed=0):
    split, task, index = prompt_id.split("/")
    return rl_prompt(task, int(index), split, seed)


# Pre-training draws its samples from index 0 upward; RL prompts start far above, so the policy
# trains on prompts it has never seen (measured in this project: on reused prompts the sampled
# reward rose by memory while the held-out reward fell).
FRESH = 10 ** 9


class PromptStream:
    """This rank's endless stream of training prompts: global position k holds task
    tasks[k % n] (the tasks in turn, so every batch mixes them evenly), index k // n; rank r
    reads positions r, r + world, ... `position` (per rank) is all a resume needs."""

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
    """n held-out prompts per task, indices first..first+n-1 of the held-out split. The
    before/after table uses the first n; choosing the tasks uses the next n, so that the choice
    does not favour tasks the SFT model got lucky on."""
    return [rl_prompt(task, i, "heldout", seed) for task in tasks for i in range(first, first + n)]


# -----------------------------------------------------------------------------
# 3. Rollouts: G responses per prompt from one prefill, scored by the reward pool
# -----------------------------------------------------------------------------

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
               "second_per_grid_ts")

# The response budget of RL, in tokens: about twice the longest answer of the task in the SFT
# data (synthetic.py at default difficulty: count 2, ocr 4, caption 13, video_grounding 14,
# text_math 21, ground_point 22, visual_math 28, ground_box 32), so a response may run a little
# longer than the data before it is cut; a cut response has no final answer and scores as such
# (rewards.py). Evaluation keeps its own, more generous budgets (evaluate.MAX_NEW_TOKENS).
RESPONSE_BUDGET = {"count": 8, "video_count": 8, "ocr": 16, "caption": 32, "video_grounding": 32,
                   "text_math": 48, "ground_point": 48, "visual_math": 64, "ground_box": 64}


@dataclass
class Response:
    ids: list               # response token ids, ending with the stop token if the model stopped
    logprobs: list          # log pi(id) of each, as the sampler computed them
    text: str               # decoded, without the stop token
    truncated: bool         # ran into the budget before a stop token
    reward: float = 0.0
    components: dict = field(default_factory=dict)
    trainable: bool = True  # False: a stand-in for an empty response (nothing to learn from)


@dataclass
class Group:
    """One prompt and its G responses: the unit of the advantage and of dynamic sampling."""
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

    @property
    def solved(self):
        return all(passed(reward_tag(self.prompt), r) for r in self.rewards)


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


@torch.no_grad()
def sample_groups(model, processor, prompts, group_size, max_new_tokens=None, seed=0, max_rows=128,
                  slots=None):
    """G responses per prompt at temperature 1 with model.generate(n=G): the G samples of a
    prompt share one prefill and its KV cache. Task by task (each has its own budget), at most
    max_rows // G prompts per call, in the weights' dtype (no autocast: the sampled distribution
    is the policy's own). -> [Group].

    slots: each prompt's place in the batch of all ranks (default 0, 1, ...). A call's random
    stream is seeded by `seed` and the slot of its first prompt, not by the rank, so with one
    prompt per call (max_rows = G) a prompt gets the same responses however many processes share
    the batch: runs on 1 and on N processes sample alike (tested through torchrun)."""
    slots = list(range(len(prompts))) if slots is None else list(slots)
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
    groups = [None] * len(prompts)
    for task, idx in by_task.items():
        for a in range(0, len(idx), per_call):
            chunk = idx[a:a + per_call]
            batch = collate_prompts([encoded[i] for i in chunk], processor.pad_token_id)
            tokens, logprobs = model.generate(
                **{k: v.to(model.device) for k, v in batch.items()}, n=group_size,
                max_new_tokens=max_new_tokens or RESPONSE_BUDGET.get(task, 64), temperature=1.0,
                seed=seed * 7919 + slots[chunk[0]], stop_token_ids=processor.eos_token_ids,
                return_logprobs=True)
            tokens, logprobs = tokens.cpu().tolist(), logprobs.float().cpu().tolist()
            for j, i in enumerate(chunk):
                responses = []
                for ids, lps in zip(tokens[j * group_size:(j + 1) * group_size],
                                    logprobs[j * group_size:(j + 1) * group_size]):
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
    """Every response's reward and components through the reward pool (Reward-as-a-Service).
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


def collect_groups(model, processor, stream, easy_pool, pool, cfg, seed=0, rank=0, world_size=1):
    """This rank's groups for one rollout batch -> (kept, sampled).

    Prompts come from the stream or, with probability easy_pool.prob, from the easy pool. With
    dynamic sampling, groups without signal are dropped and new prompts drawn, at most
    cfg.max_refills more times. `sampled` is every group scored (the metrics describe what the
    policy does, not only what is kept). If fewer than cfg.updates_per_batch groups survive,
    dropped ones come back as padding (no token counts) so every rank joins every DDP update.
    The i-th draw of this rank holds slot i * world_size + rank of the batch of all ranks, the
    slot PromptStream reads it from (sample_groups seeds by slot)."""
    kept, dropped, sampled = [], [], []
    for attempt in range(1 + (cfg.max_refills if cfg.dynamic_sampling else 0)):
        need = cfg.prompts_per_rank - len(kept)
        if need <= 0:
            break
        draws = [easy_pool.draw(stream) for _ in range(need)]
        groups = sample_groups(model, processor, [p for p, _ in draws], cfg.group_size,
                               cfg.max_new_tokens, seed * 31 + attempt, cfg.max_rows,
                               [i * world_size + rank for i in range(need)])
        score_groups(groups, pool)
        for g, (_, from_easy) in zip(groups, draws):
            g.from_easy = from_easy
            easy_pool.update(g.prompt, g.solved)
            (kept if not cfg.dynamic_sampling or has_signal(g.rewards) else dropped).append(g)
        sampled += groups
    while len(kept) < cfg.updates_per_batch:
        g = dropped.pop()
        g.padding = True
        kept.append(g)
    return kept, sampled
