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
the head in extra.safetensors.

Where it runs. At the tiny scale the reward model sits in the training process (load). At 7B the
policy's GPUs have no room for a second 7B model, so, as the report's reward models are served
as standalone services ("Reward-as-a-Service", §3.3), RewardModelServer loads the folder in a
child process on a device of its own and answers batches over a pipe:

    with RewardModelServer("runs/rl/reward_model", device="cuda:7", dtype="bf16") as server:
        register_reward_model(scorer(server, processor))
        server.logits(processor(conversations, add_generation_prompt=False))  # [r, ...]

train_rl.py takes either through preference_scorer (--rm-device chooses). Both places compute a
batch's logits with batch_logits, so a server in fp32 gives the in-process
model's logits exactly. Tests: tests/test_rl.py (ranks held-out pairs, save/load, NaN),
tests/test_rm_process.py (the server: same logits and rewards, load errors, a killed child).
"""

import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
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
def batch_logits(rm, batch, compute):
    """A processed batch of B conversations (processor output, on any device) -> its B
    Bradley-Terry logits as floats, on compute's device under its autocast."""
    with compute.autocast():
        return rm(**{k: v.to(compute.device) for k, v in batch.items()}).tolist()


def accuracy(rm, processor, pairs, compute, batch_size=32):
    """Fraction of pairs with r(chosen) > r(rejected) (a tie counts half), overall and per
    source task."""
    rm.eval()
    right = {}
    for a in range(0, len(pairs), batch_size):
        part = pairs[a:a + batch_size]
        s = batch_logits(rm, pair_batch(part, processor), compute)
        for p, m in zip(part, (c - r for c, r in zip(s[:len(part)], s[len(part):]))):
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


def check_folder(path):
    """Fail with a one-line error unless `path` looks like a reward model folder (save's output)."""
    if not os.path.isfile(os.path.join(path, "extra.safetensors")):
        training.fail(f"{path} is not a reward model folder (no extra.safetensors with the scalar "
                      "head); train one with `python train_rl.py --train-rm`")


def load(path, device="cpu", dtype=torch.float32):
    """A reward model folder (save's output) -> (RewardModel in eval mode, its record)."""
    from safetensors.torch import load_file
    check_folder(path)
    rm = RewardModel(MiMoVL.from_pretrained(path, dtype=dtype, device=device, progress=False))
    rm.head.load_state_dict({k[len("head."):]: v for k, v in
                             load_file(os.path.join(path, "extra.safetensors")).items()})
    with open(os.path.join(path, "pretrain_stage.json")) as f:
        record = json.load(f)
    return rm.to(device=device, dtype=dtype).eval(), record


def scorer(rm, processor, compute=None):
    """The router's "preference" reward: sigmoid of the BT logit of (prompt, response). `rm` is a
    RewardModel in this process (run on compute's device under its autocast) or a
    RewardModelServer (compute unused). A non-finite logit scores 0 with an error (clamping first
    would turn NaN into 1.0)."""
    if isinstance(rm, RewardModelServer):
        logits = rm.logits
    elif compute is None:
        raise ValueError("scorer: a reward model in this process needs `compute` (its device and autocast)")
    else:
        def logits(batch):
            return batch_logits(rm, batch, compute)

    def score(response, ground_truth, messages=None, **meta):
        if messages is None:
            raise ValueError("the reward model needs the prompt: pass meta {'messages': ...}")
        batch = processor([list(messages) + [{"role": "assistant", "content": response}]],
                          add_generation_prompt=False)
        logit = float(logits(batch)[0])
        if not math.isfinite(logit):
            return 0.0, {"rm_logit": logit, "error": f"reward model logit {logit}"}
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))), {"rm_logit": logit}
    return score


# -----------------------------------------------------------------------------
# the reward model in a process of its own

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preference_scorer(path, processor, compute, device="", stack=None):
    """The "preference" reward of train_rl.py from the reward model folder `path`: in this process
    on compute.device (device ""), or in a process of its own on `device` (RewardModelServer, the
    report's §3.3 reward models as services; "{local_rank}" in the device names the rank's own
    GPU), closed with `stack` (a contextlib.ExitStack). A server that dies stops the run: its
    rewards would otherwise silently be 0. Returns (score function, the folder's record)."""
    if not device:
        rm, record = load(path, compute.device)
        return scorer(rm, processor, compute), record
    device = device.replace("{local_rank}", str(compute.local_rank))
    server = RewardModelServer(path, device, "bf16" if device.startswith("cuda") else "fp32", threads=1)
    if stack is not None:
        stack.enter_context(server)
    compute.print(f"reward model: its own process on {device} (one per rank)")
    score = scorer(server, processor)

    def checked(*a, **kw):
        if not server.process.is_alive():
            training.fail(f"the reward model process on {device} died (exit code "
                          f"{server.process.exitcode}; out of memory?); resume with --resume")
        return score(*a, **kw)
    return checked, server.record


class RewardModelServer:
    """A reward model folder loaded by a child process on its own device, answering batches.

        server = RewardModelServer(path, device="cuda:1", dtype="bf16")   # waits until loaded
        server.logits(batch)      # processor output for B conversations -> B BT logits (floats)
        server.record             # the folder's pretrain_stage.json (held-out accuracy...)
        server.close()            # or: with RewardModelServer(...) as server:

    The child is started with multiprocessing's spawn method (a fork of a process that holds
    torch's threads or a CUDA context is unsafe), as a daemon, so it ends with this process; it
    ignores Ctrl-C, which this process handles. dtype is the weights' dtype, with no autocast:
    "fp32" reproduces the in-process model's logits exactly, "bf16" halves the memory. threads
    sets the child's torch threads (CPU).

    Batches and answers travel over a multiprocessing Pipe (pickled, tensors through shared
    memory): both ends are processes of this program, no file or network data is unpickled. A
    folder that is not a reward model folder fails here at once; one the child cannot load (bad
    weights, a device that does not exist) fails with the child's one-line reason, both through
    training.fail as load does (exit status 2). A request whose answer does not come -- the child
    was killed or ran out of memory, or took longer than timeout_s -- raises RuntimeError; so does
    an error in the child (a malformed batch), which leaves the server running. Requests from
    several threads are taken one at a time.
    """

    def __init__(self, path, device="cpu", dtype="fp32", threads=None, timeout_s=300.0):
        if dtype not in DTYPES:
            raise ValueError(f"reward model dtype {dtype!r}: use one of {sorted(DTYPES)}")
        check_folder(path)
        self.path, self.device, self.timeout_s = path, str(torch.device(device)), timeout_s
        self._lock = threading.Lock()
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child_end, path, self.device, dtype, threads),
                                   name="reward-model", daemon=True)
        self.process.start()
        child_end.close()        # only the child holds its end now: its death reads as EOF here
        try:
            self.record = self._answer("loading", timeout_s=None)
        except RuntimeError as e:
            self.close()
            training.fail(str(e))

    def logits(self, batch):
        """The Bradley-Terry logits (a list of B floats) of a processed batch of B conversations."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"the reward model server for {self.path} is closed")
            try:
                self._conn.send(("logits", {k: v.cpu() for k, v in batch.items()}))
            except OSError:                 # the pipe broke: the child is gone
                pass                        # _answer says why
            return self._answer("scoring", self.timeout_s)

    def _answer(self, doing, timeout_s):
        """Wait for the child's answer, checking that it is alive; raise on its death or error."""
        where = f"the reward model process for {self.path} on {self.device}"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                self.close()                # a late answer would pair with the next request
                raise RuntimeError(f"{where} gave no answer in {timeout_s:.0f} s while {doing}; "
                                   "stopped it")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            code = self.process.exitcode
            if code is not None and code < 0:
                how = f"killed by {signal.Signals(-code).name}" + (
                    ": out of memory?" if -code == signal.SIGKILL else "")
            else:
                how = f"exit code {code}: its error is printed above"
            raise RuntimeError(f"{where} died while {doing} ({how}); "
                               "start a new RewardModelServer") from None
        if kind == "error":
            raise RuntimeError(f"{where} failed while {doing}: {payload}")
        return payload

    def close(self, timeout_s=10.0):
        """Ask the child to stop, wait for it, kill it if it does not; idempotent."""
        if self._conn is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(("stop", None))
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
        self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(conn, path, device, dtype, threads):
    """The child: load the folder, answer ("ready", record) or ("error", reason); then answer
    each ("logits", batch) with ("logits", floats) or ("error", reason) until ("stop", None) or
    the parent's end closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    said = io.StringIO()             # training.fail's one line goes to stderr: catch it
    try:
        if torch.device(device).type == "cuda":
            if (torch.device(device).index or 0) >= torch.cuda.device_count():
                raise ValueError(f"torch sees {torch.cuda.device_count()} GPU(s) here")
            torch.cuda.set_device(device)
        with contextlib.redirect_stderr(said):
            rm, record = load(path, device, DTYPES[dtype])
    except BaseException as e:       # SystemExit from training.fail too
        reason = said.getvalue().strip().removeprefix("error: ") or f"{type(e).__name__}: {e}"
        conn.send(("error", " ".join(reason.split())[:600]))
        return
    sys.stderr.write(said.getvalue())
    compute = training.Compute(torch.device(device))
    conn.send(("ready", record))
    while True:
        try:
            kind, batch = conn.recv()
        except EOFError:             # the parent is gone
            return
        if kind == "stop":
            return
        try:
            conn.send(("logits", batch_logits(rm, batch, compute)))
        except Exception as e:       # noqa: BLE001 -- a bad batch must not end the server
            conn.send(("error", " ".join(f"{type(e).__name__}: {e}".split())[:600]))


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
