"""train_rl.py's RL loop through the real model (MiMo-VL report §3): the update's loss equals a
hand computation from an independent forward under both normalisers, the ratio is exactly 1 with
one update per batch, a tiny policy learns a fixed answer with the real rollout + update code,
dynamic sampling and the easy pool inside the rollout, the Bradley-Terry reward model
(reward_model.py), resume, no run deleted without a flag, a 2-process torchrun, and the main
job's progress (main_job.py) read from the JSON files its children write.

The policy is a tiny random MiMoVL (2 + 2 layers, width 64) with a word-level tokenizer of 38
tokens, so that a random policy says the right number often enough to learn from. Everything
runs on one CPU thread: tiny matmuls are faster that way, and much faster on a loaded machine.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import main_job
import reward_model
import synthetic
import training
import rewards as R
import rollouts
import train_rl as rl
from mimovl import MiMoVLConfig
from processor import Processor

WORDS = ["[UNK]", *"0123456789", "How", "many", "red", "green", "blue", "yellow", "shapes",
         "are", "there", "?", "system", "user", "assistant", "good", "bad", "answer"]


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def make_processor():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(synthetic.SPECIAL_TOKENS)}       # ids 0..9 as the tiny preset
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in synthetic.SPECIAL_TOKENS])
    return Processor(tok)


def tiny_config(vocab_size):
    cfg = MiMoVLConfig.preset("tiny")
    t, v = cfg.text, cfg.vision
    t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers = vocab_size, 64, 128, 2
    t.num_attention_heads, t.num_key_value_heads, t.mrope_section = 4, 2, [2, 3, 3]
    v.depth, v.hidden_size, v.intermediate_size, v.num_heads = 2, 32, 64, 2
    v.fullatt_block_indexes, v.out_hidden_size = [1], 64
    return cfg.validate()


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def tiny_policy(processor, seed=0):
    torch.manual_seed(seed)
    return rl.Policy(tiny_config(processor.tokenizer.get_vocab_size()))


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, processor):
    """A tiny "SFT" folder as train_pretrain writes it (weights, config, tokenizer, template)."""
    path = str(tmp_path_factory.mktemp("sft"))
    model = tiny_policy(processor)
    training.save_stage_folder(path, model.state_dict(), model.cfg, processor, {"stage": "test"})
    return path


class FixedAnswer(rollouts.PromptStream):
    """Counting prompts whose ground truth is always `answer`: "always answer 3" is learnable
    without looking at the image."""

    def __init__(self, answer="3", **kw):
        super().__init__(["count"], **kw)
        self.answer = answer

    def __next__(self):
        return {**super().__next__(), "answer": self.answer}


CPU = training.compute_init("cpu", "fp32", quiet=True)


def rollout(policy, processor, n_prompts=3, G=4, seed=0, max_new_tokens=4):
    cfg = rl.RLConfig(group_size=G, prompts_per_rank=n_prompts, max_new_tokens=max_new_tokens,
                      dynamic_sampling=False).validate()
    with R.RewardPool(0) as pool:
        kept, _ = rollouts.collect_groups(policy, processor, FixedAnswer(), rollouts.EasyPool(0.0), pool, cfg,
                                    seed=seed)
    return kept


def set_rewards(groups, pattern):
    for g, rewards in zip(groups, pattern):
        for r, x in zip(g.responses, rewards):
            r.reward = x


# -----------------------------------------------------------------------------
# the update through the real model
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["group", "token-mean"])
def test_update_loss_equals_hand_computation_from_separate_forwards(processor, norm):
    policy = tiny_policy(processor, seed=1)
    groups = rollout(policy, processor)
    pattern = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3]]
    set_rewards(groups, pattern)
    # by hand: A = (r - mean) / (sample std + 1e-6) per group; every response's log-probs from its
    # own unpacked, unpadded forward through the logits path (not token_logprobs, not packing);
    # group: sum over groups of (group's sum of -A logp) / (3 groups * group's tokens);
    # token-mean: (sum of -A logp over the batch) / (tokens of the batch)
    per_group = []                                    # (sum of -A logp, tokens) per group
    with torch.no_grad():
        for g, rewards in zip(groups, pattern):
            total, n_tokens = 0.0, 0
            r = torch.tensor(rewards, dtype=torch.float64)
            adv = torch.zeros(4, dtype=torch.float64) if r.max() == r.min() else \
                (r - r.mean()) / (r.std() + 1e-6)
            p = g.encoded["input_ids"]
            vision = {k: g.encoded[k] for k in rollouts.VISION_KEYS if k in g.encoded}
            for resp, a in zip(g.responses, adv.tolist()):
                if not resp.trainable:      # an empty response's stand-in: not a response token
                    continue
                ids = torch.cat([p, torch.tensor(resp.ids)])[None]
                logits = rl.MiMoVL.forward(policy, ids, **vision).logits[0].double()
                logp = logits.log_softmax(-1)[len(p) - 1:-1].gather(-1, torch.tensor(resp.ids)[:, None])
                total += -a * float(logp.sum())
                n_tokens += len(resp.ids)
            per_group.append((total, n_tokens))
    if norm == "group":
        expected = sum(s / (len(per_group) * n) for s, n in per_group)
    else:
        expected = sum(s for s, _ in per_group) / sum(n for _, n in per_group)
    opt = training.build_optimizer(policy, 1e-3, 0.0, (0.9, 0.999), CPU.device)
    steps = rl.policy_update(policy, opt, groups, rl.RLConfig(group_size=4, prompts_per_rank=3,
                                                              loss_norm=norm), CPU)
    assert len(steps) == 1
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_one_update_per_batch_ratio_is_exactly_one_and_matches_the_onpolicy_step(processor):
    policy = tiny_policy(processor, seed=2)
    groups = rollout(policy, processor, seed=3)
    set_rewards(groups, [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    twin = copy.deepcopy(policy)
    opt_a = training.build_optimizer(policy, 1e-3, 0.0, (0.9, 0.999), CPU.device)
    opt_b = training.build_optimizer(twin, 1e-3, 0.0, (0.9, 0.999), CPU.device)
    (on,) = rl.policy_update(policy, opt_a, groups, rl.RLConfig(group_size=4, prompts_per_rank=3), CPU)
    (van,) = rl.policy_update(twin, opt_b, groups, rl.RLConfig(
        algo="grpo", group_size=4, prompts_per_rank=3, updates_per_batch=1), CPU)
    # pi_old by the training forward before the step == pi_theta at the step: ratio exactly 1
    assert van["ratio_mean"] == 1.0 and van["clip_frac"] == 0.0
    # the sampler (KV cache, batched, left-padded) and the packed training forward agree, so the
    # packed rows hold exactly the sampled tokens at the right positions
    assert on["logprob_diff"] < 1e-5
    # and the clipped surrogate at ratio 1 takes the on-policy step
    for (name, a), b in zip(policy.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)
    # vanilla GRPO with several updates: from the second one on the ratio has moved
    van2 = rl.policy_update(twin, opt_b, groups, rl.RLConfig(
        algo="grpo", group_size=4, prompts_per_rank=3, updates_per_batch=3), CPU)
    assert len(van2) == 3 and van2[0]["ratio_mean"] == 1.0 and van2[-1]["ratio_mean"] != 1.0


def test_rl_config_refuses_offpolicy_steps_in_onpolicy_mode():
    with pytest.raises(ValueError, match="exactly one optimiser step"):
        rl.RLConfig(updates_per_batch=2).validate()
    with pytest.raises(ValueError, match="group-size"):
        rl.RLConfig(group_size=1).validate()


# -----------------------------------------------------------------------------
# a real learning test
# -----------------------------------------------------------------------------

def test_tiny_policy_learns_to_always_answer_three(processor):
    """Random init: the policy says a lone "3" (reward 1) a few % of the time. The real loop —
    generate G=8 from one prefill, count reward through the pool, dynamic sampling, packed
    log-probs, one AdamW step per batch — must make it answer "3" to unseen prompts."""
    policy = tiny_policy(processor, seed=0)
    opt = training.build_optimizer(policy, 3e-3, 0.0, (0.9, 0.999), CPU.device)
    cfg = rl.RLConfig(group_size=8, prompts_per_rank=4, max_new_tokens=3, max_refills=0).validate()
    stream, easy = FixedAnswer(seed=0), rollouts.EasyPool(0.1, seed=0)
    curve = []
    with R.RewardPool(num_workers=1) as pool:
        for step in range(30):
            kept, sampled = rollouts.collect_groups(policy, processor, stream, easy, pool, cfg, seed=step)
            rl.policy_update(policy, opt, kept, cfg, CPU)
            rewards = [r.reward for g in sampled for r in g.responses]
            curve.append(sum(rewards) / len(rewards))
        assert sum(curve[:3]) / 3 < 0.2
        assert sum(curve[-5:]) / 5 > 0.8, curve
        # greedy answers on held-out prompts (never trained on) are now "3"
        prompts = [{**p, "answer": "3"} for p in rollouts.heldout_prompts(["count"], 8)]
        res, _ = evaluate.evaluate_rewards(policy, processor, prompts, CPU, pool)
    assert res["count"]["reward"] == 1.0


def test_collect_groups_drops_uniform_groups_and_fills_the_easy_pool(processor, monkeypatch):
    policy = tiny_policy(processor)
    monkeypatch.setitem(R.REWARDS, "count", lambda response, truth, **m: (1.0, {}))
    cfg = rl.RLConfig(group_size=2, prompts_per_rank=2, max_new_tokens=2, max_refills=1).validate()
    easy = rollouts.EasyPool(0.0)
    with R.RewardPool(0) as pool:
        kept, sampled = rollouts.collect_groups(policy, processor, FixedAnswer(), easy, pool, cfg)
    # every group solved: dropped, refilled once (2 + 2 prompts), all four in the easy pool, and
    # one dropped group comes back as padding (no tokens) so that an update can still run
    assert len(sampled) == 4 and len(easy) == 4
    assert len(kept) == 1 and kept[0].padding
    rows = rl.pack_rows(kept, torch.zeros(1, 2), torch.zeros(1, 2), 4096)
    assert all(float(r["mask"].sum()) == 0 for r in rows)


# -----------------------------------------------------------------------------
# the Bradley-Terry reward model
# -----------------------------------------------------------------------------

def toy_pairs(n, seed):
    """The preferred answer names a small number ("good 0".."good 4"), the rejected one a large
    number ("bad 5".."bad 9"), for a random counting question."""
    g = torch.Generator().manual_seed(seed)
    colours = ["red", "green", "blue", "yellow"]
    out = []
    for _ in range(n):
        c, a, b = (int(x) for x in torch.randint(0, 4, (1,), generator=g).tolist() +
                   torch.randint(0, 5, (2,), generator=g).tolist())
        out.append({"messages": [{"role": "user", "content": f"How many {colours[c]} shapes ?"}],
                    "chosen": f"good {a}", "rejected": f"bad {b + 5}"})
    return out


def test_reward_model_ranks_chosen_above_rejected_on_heldout_pairs(processor, tmp_path):
    torch.manual_seed(0)
    rm = reward_model.RewardModel(tiny_policy(processor, seed=4))
    heldout = toy_pairs(40, seed=123)
    before = reward_model.accuracy(rm, processor, heldout, CPU)["accuracy"]
    opt = training.build_optimizer(rm, 3e-3, 0.0, (0.9, 0.95), CPU.device)
    stage = dict(lr=3e-3, min_lr=3e-4, warmup=3, steps=30)
    reward_model.fit(rm, opt, processor, lambda step: toy_pairs(8, seed=step), stage, CPU)
    after = reward_model.accuracy(rm, processor, heldout, CPU)["accuracy"]
    assert before == 0.5         # zero-initialised head: every score 0, every pair a tie
    assert after >= 0.95
    # saved, loaded and queried through the router like any other reward
    reward_model.save(str(tmp_path / "rm"), rm, processor, {"stage": "test"}, CPU)
    loaded, _ = reward_model.load(str(tmp_path / "rm"))
    try:
        R.register_reward_model(reward_model.scorer(loaded, processor, CPU))
        p = heldout[0]
        good, comp = R.compute_reward("preference", p["chosen"], None, messages=p["messages"])
        bad, _ = R.compute_reward("preference", p["rejected"], None, messages=p["messages"])
        assert 0.5 < good <= 1.0 and 0.0 <= bad < 0.5 and "rm_logit" in comp
        missing, comp = R.compute_reward("preference", "good 1", None)      # no prompt given
        assert missing == 0.0 and "messages" in comp["error"]
    finally:
        R.register_reward_model(None)


# -----------------------------------------------------------------------------
# the command line: resume, torchrun
# -----------------------------------------------------------------------------

def run_args(sft_dir, out, *extra):
    return ["--sft", sft_dir, "--out", str(out), "--tasks", "count", "--steps", "3",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3",
            "--eval-n", "2", "--precision", "fp32", "--device", "cpu", "--reward-workers", "0",
            "--lr", "1e-3", "--no-dynamic-sampling", *extra]


def test_resume_continues_exactly(sft_dir, tmp_path):
    straight = rl.main(run_args(sft_dir, tmp_path / "a"))
    with pytest.raises(SystemExit) as stop:
        rl.main(run_args(sft_dir, tmp_path / "b", "--save-every", "1", "--debug-stop-after", "2"))
    assert stop.value.code == 3
    resumed = rl.main(run_args(sft_dir, tmp_path / "b", "--save-every", "1", "--resume"))
    a = rl.MiMoVL.from_pretrained(str(tmp_path / "a" / "final"), progress=False)
    b = rl.MiMoVL.from_pretrained(str(tmp_path / "b" / "final"), progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert resumed["rl"] == straight["rl"]
    assert "count" in straight["table"] and straight["tasks"] == ["count"]


def test_torchrun_two_processes(sft_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_rl.py", *run_args(sft_dir, tmp_path / "ddp", "--steps", "2", "--threads", "1")]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    records = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    # each rank sampled its own prompt: 2 groups of 2 responses per step, all ranks together
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sampled_groups"] == 2 and r["updates"] == 1 for r in records)
    assert os.path.isfile(tmp_path / "ddp" / "final" / "model.safetensors")


def test_a_finished_run_is_not_deleted_without_resume_or_overwrite(sft_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rl.main(run_args(sft_dir, out))
    kept = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "summary.md")}
    with pytest.raises(SystemExit) as stop:
        rl.main(run_args(sft_dir, out))
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert all((out / name).read_bytes() == b for name, b in kept.items())
    assert (out / "final" / "model.safetensors").is_file()
    rl.main(run_args(sft_dir, out, "--overwrite", "--steps", "1"))         # said so: starts again
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("flag", [["--temperature", "0.7"], ["--top-p", "0.9"],
                                  ["--algo", "grpo", "--temperature", "1.2"]])
def test_cli_refuses_rollouts_that_do_not_sample_from_the_policy(sft_dir, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        rl.main(run_args(sft_dir, tmp_path / "t", *flag))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "temperature 1, top-p 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()                       # refused before anything ran


def test_nonfinite_reward_model_logit_scores_zero(processor):
    rm = reward_model.RewardModel(tiny_policy(processor, seed=4))
    with torch.no_grad():
        rm.head.bias.fill_(float("nan"))
    R.register_reward_model(reward_model.scorer(rm, processor, CPU))
    try:
        messages = [{"role": "user", "content": "How many red shapes ?"}]
        reward, comp = R.compute_reward("preference", "good 1", None, messages=messages)
    finally:
        R.register_reward_model(None)
    assert reward == 0.0 and "error" in comp


def test_main_job_progress_comes_from_the_json_files_the_children_write(tmp_path):
    pre, out = tmp_path / "pre", tmp_path / "rl"
    pre.mkdir(), out.mkdir()
    assert main_job.phase_progress("pre-training", str(pre), str(out)) is None     # nothing yet
    stage = next(iter(main_job.train_pretrain.STAGES.values()))
    with open(pre / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"stage": stage.key, "step": 7, "loss": 2.5}) + "\n")
        f.write('{"stage": "' + stage.key + '", "st')                 # a line being written
    assert main_job.phase_progress("pre-training", str(pre), str(out)) == (
        f"stage {stage.key}", 7, stage.steps, "loss 2.500")
    rl.write_progress(str(out), "rl", 3, 40, "r 0.50", CPU)
    assert main_job.phase_progress("rl", str(pre), str(out)) == ("rl", 3, 40, "r 0.50")
    assert main_job.phase_progress("reward model", str(pre), str(out)) is None   # another phase


def test_main_job_phase_follows_its_child_and_reports_a_failure(tmp_path):
    from tqdm import tqdm
    out = tmp_path / "rl"
    out.mkdir()
    child = ("import json, os, sys, time\n"
             "for s in range(1, 4):\n"
             f"    json.dump({{'phase': 'rl', 'step': s, 'total': 3, 'status': 'r'}}, open('{out}/p.tmp', 'w'))\n"
             f"    os.replace('{out}/p.tmp', '{out}/progress.json')\n"
             "    time.sleep(1.5)\n"
             "print('done'); sys.exit(int(sys.argv[1]))\n")
    bar = tqdm(total=1, disable=True)
    main_job.run_phase("rl", "main job [3/4 rl", [sys.executable, "-c", child, "0"],
                       str(tmp_path / "ok.log"), bar, str(tmp_path), str(out))
    assert bar.total == 3 and bar.n >= 2 and "done" in (tmp_path / "ok.log").read_text()
    with pytest.raises(SystemExit, match="failed \\(exit 5\\).*bad.log"):
        main_job.run_phase("rl", "main job [3/4 rl", [sys.executable, "-c", child, "5"],
                           str(tmp_path / "bad.log"), tqdm(total=1, disable=True), str(tmp_path), str(out))
