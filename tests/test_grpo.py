"""GRPO math of train_rl.py (MiMo-VL report §3, eq. 1-2; DAPO; DeepSeekMath): advantages, the
two loss normalisers, the on-policy and clipped losses, dynamic sampling, the easy pool, and a toy
policy that learns from a real reward.

References are hand computations (numbers worked out in the comments) or explicit float64 loops
over the formula, never the code under test.
"""

import math

import pytest
import torch

import evaluate
import rewards as R
import rollouts
import train_rl as rl


# -----------------------------------------------------------------------------
# group advantages
# -----------------------------------------------------------------------------

def test_group_advantages_hand_values():
    rewards = [[1.0, 0.0, 0.0, 1.0],      # mean 1/2, sample std sqrt((4 * 1/4) / 3) = sqrt(1/3)
               [1.0, 0.0, 0.0, 0.0],      # mean 1/4, sample var (9/16 + 3/16) / 3 = 1/4, std 1/2
               [0.2, 0.2, 0.2, 0.2]]      # all equal: advantage exactly 0
    eps = 1e-6
    a = rl.group_advantages(rewards, eps=eps)
    s = 0.5 / (math.sqrt(1 / 3) + eps)
    expected = torch.tensor([[s, -s, -s, s], [0.75 / (0.5 + eps)] + [-0.25 / (0.5 + eps)] * 3,
                             [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12)
    assert (a[2] == 0).all()
    # the float mean of three 0.1 is not 0.1 (0.1 - mean = -1.4e-17): still exactly 0
    assert (rl.group_advantages([[0.1, 0.1, 0.1]]) == 0).all()


def test_group_advantages_eps_and_shape_errors():
    a = rl.group_advantages(torch.tensor([[1.0, 0.0]]), eps=0.5)   # sample std sqrt(1/2)
    expected = 0.5 / (math.sqrt(0.5) + 0.5)
    torch.testing.assert_close(a, torch.tensor([[expected, -expected]]))
    with pytest.raises(ValueError, match="G >= 2"):
        rl.group_advantages([[1.0], [0.0]])
    with pytest.raises(ValueError, match="n_groups, G"):
        rl.group_advantages([1.0, 0.0])


# -----------------------------------------------------------------------------
# the loss normaliser
# -----------------------------------------------------------------------------

def test_loss_weights_group_and_token_mean_by_hand():
    # group 1: responses of 3 and 1 tokens (4 in all); group 2: 2 tokens and a response that does
    # not count (0); group 3: nothing counts (all padding): it is not a group of the batch
    lengths = [[3, 1], [2, 0], [0, 0]]
    # group (report eq. 1): 1 / (n_groups * group tokens) = 1 / (2 * 4) and 1 / (2 * 2)
    torch.testing.assert_close(rl.loss_weights(lengths, "group"), torch.tensor(
        [[1 / 8, 1 / 8], [1 / 4, 0.0], [0.0, 0.0]], dtype=torch.float64), rtol=0, atol=0)
    # token-mean (DAPO / verl): 1 / (all tokens of the batch) = 1 / 6
    torch.testing.assert_close(rl.loss_weights(lengths, "token-mean"), torch.tensor(
        [[1 / 6, 1 / 6], [1 / 6, 0.0], [0.0, 0.0]], dtype=torch.float64), rtol=0, atol=0)
    # totals over other ranks / micro-batches replace the local ones
    assert rl.loss_weights([[3, 1]], "group", n_groups=4)[0, 0].item() == 1 / 16
    assert rl.loss_weights([[3, 1]], "token-mean", n_tokens=20)[0, 0].item() == 1 / 20
    with pytest.raises(ValueError, match="token-mean"):
        rl.loss_weights(lengths, "sequence")


# -----------------------------------------------------------------------------
# the on-policy loss on a toy policy
# -----------------------------------------------------------------------------
# Toy policy: a free table of logits, one (V,) row per response position. log pi(token) is a
# log-softmax, whose gradient we know in closed form: d log p_a / d logits = onehot(a) - softmax.
# Four responses in two groups of G = 2: group 1 has 4 + 2 response tokens, group 2 has 3 + 1.

B, T, V = 4, 4, 5
TOKENS = [[1, 4, 0, 2], [3, 3, 1, 0], [2, 0, 4, 4], [0, 1, 2, 3]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]]
LENGTHS = [[4, 2], [3, 1]]
ADV = [1.5, -0.5, 0.25, -1.0]
HAND_WEIGHTS = {"group": [1 / 12, 1 / 12, 1 / 8, 1 / 8],        # 1 / (2 groups * 6), 1 / (2 * 4)
                "token-mean": [1 / 10] * 4}                     # 1 / (6 + 4)


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    return logits


def _logprobs(logits):
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS)[..., None])[..., 0]


def _weights(norm="group"):
    """(B, T) token weights: the response's loss_weights on its tokens, 0 elsewhere."""
    w = rl.loss_weights(LENGTHS, norm).view(B, 1)
    return w * torch.tensor(MASK, dtype=torch.float64)


def _hand_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("norm", ["group", "token-mean"])
def test_onpolicy_loss_and_gradient_match_hand_computation(norm):
    logits = _toy()
    loss = rl.policy_loss(_logprobs(logits), torch.tensor(ADV, dtype=torch.float64), _weights(norm))
    loss.backward()

    rows = logits.detach().tolist()
    hand_loss = 0.0
    hand_grad = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    for i in range(B):
        w = HAND_WEIGHTS[norm][i]
        for t in range(T):
            if not MASK[i][t]:
                continue
            p = _hand_softmax(rows[i][t])
            hand_loss -= w * ADV[i] * math.log(p[TOKENS[i][t]])
            for v in range(V):                          # -w A (onehot - softmax)
                hand_grad[i][t][v] = -w * ADV[i] * ((v == TOKENS[i][t]) - p[v])
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12)
    torch.testing.assert_close(logits.grad, torch.tensor(hand_grad, dtype=torch.float64),
                               rtol=1e-10, atol=1e-14)


def test_the_two_normalisers_differ_when_groups_differ_in_length():
    logits = _toy(5)
    adv = torch.tensor(ADV, dtype=torch.float64)
    group = rl.policy_loss(_logprobs(logits), adv, _weights("group"))
    token = rl.policy_loss(_logprobs(logits), adv, _weights("token-mean"))
    assert abs(group.item() - token.item()) > 1e-3


def test_ratio_is_exactly_one_with_one_update_per_batch():
    logits = _toy(1)
    with torch.no_grad():                              # the rollout's log-probs
        rollout_lp = _logprobs(logits)
    lp = _logprobs(logits)                             # the training forward, same policy
    assert torch.equal(torch.exp(lp - lp.detach()), torch.ones(B, T, dtype=torch.float64))

    adv, w = torch.tensor(ADV, dtype=torch.float64), _weights()
    on_loss = rl.policy_loss(lp, adv, w, rollout_lp, mode="onpolicy")
    (on_grad,) = torch.autograd.grad(on_loss, logits)
    grpo_loss = rl.policy_loss(_logprobs(logits), adv, w, rollout_lp, mode="grpo")
    (grpo_grad,) = torch.autograd.grad(grpo_loss, logits)
    # the first (and, on-policy, only) update of a batch: at ratio 1 the clipped surrogate has the
    # on-policy gradient; its value is -sum_i w_i |o_i| A_i, since the ratio (not log pi)
    # multiplies A: -(4 * 1.5 / 12 - 2 * 0.5 / 12 + 3 * 0.25 / 8 - 1 * 1.0 / 8)
    torch.testing.assert_close(grpo_grad, on_grad, rtol=1e-14, atol=1e-16)
    assert grpo_loss.item() == pytest.approx(-(6.0 / 12 - 1.0 / 12 + 0.75 / 8 - 1.0 / 8), rel=1e-14)

    # vanilla GRPO's second step on the same batch is off-policy: the ratio has moved from 1
    opt = torch.optim.SGD([logits], lr=1.0)
    logits.grad = grpo_grad
    opt.step()
    assert not torch.equal(torch.exp(_logprobs(logits) - rollout_lp), torch.ones(B, T, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["group", "token-mean"])
def test_microbatches_with_the_batch_totals_give_the_same_gradient(norm):
    adv, mask = torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)
    logits = _toy(2)
    (full,) = torch.autograd.grad(rl.policy_loss(_logprobs(logits), adv, _weights(norm)), logits)
    logits.grad = None
    for g, rows in enumerate(([0, 1], [2, 3])):     # one group per micro-batch (or per rank)
        w = rl.loss_weights([LENGTHS[g]], norm, n_groups=2, n_tokens=10).view(2, 1) * mask[rows]
        rl.policy_loss(_logprobs(logits)[rows], adv[rows], w).backward()
    torch.testing.assert_close(logits.grad, full, rtol=1e-12, atol=1e-15)


def test_per_token_advantages_broadcast_the_same_as_per_response():
    logits = _toy(3)
    adv = torch.tensor(ADV, dtype=torch.float64)
    a = rl.policy_loss(_logprobs(logits), adv, _weights())
    b = rl.policy_loss(_logprobs(logits), adv[:, None].expand(B, T), _weights())
    assert a.item() == b.item()


# -----------------------------------------------------------------------------
# the clipped surrogate and the KL term (vanilla GRPO)
# -----------------------------------------------------------------------------

def test_clipped_surrogate_hand_values():
    # four one-token responses with ratios 1.5, 0.5, 0.5, 1.5 and advantages +1, -1, +1, -1
    lp = torch.log(torch.tensor([[0.6], [0.2], [0.2], [0.6]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.full((4, 1), 0.4, dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss = rl.policy_loss(lp, adv, torch.full((4, 1), 0.25), old, mode="grpo", eps_low=0.2,
                          eps_high=0.28)
    loss.backward()
    # per token -min(r A, clip(r, 0.8, 1.28) A), weight 1/4 each:
    #   r 1.5, A +1: min(1.5, 1.28)   = 1.28  -> -1.28   (clipped: no gradient)
    #   r 0.5, A -1: min(-0.5, -0.8)  = -0.8  -> +0.8    (clipped: no gradient)
    #   r 0.5, A +1: min(0.5, 0.8)    = 0.5   -> -0.5    gradient d(-r A)/d logp = -r A = -0.5
    #   r 1.5, A -1: min(-1.5, -1.28) = -1.5  -> +1.5    gradient -r A = +1.5
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4, rel=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0], [0.0], [-0.5 / 4], [1.5 / 4]],
                                                     dtype=torch.float64))


def test_k3_kl_hand_values():
    lp = torch.log(torch.tensor([[0.5]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25]], dtype=torch.float64))
    loss = rl.policy_loss(lp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), lp.detach(),
                          mode="grpo", kl_beta=0.1, ref_logprobs=ref)
    loss.backward()
    # d = ref - logp = log(1/2); k3 = e^d - d - 1 = 1/2 + ln 2 - 1; d k3 / d logp = 1 - e^d = 1/2
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-12)
    assert lp.grad.item() == pytest.approx(0.1 * 0.5, rel=1e-12)


def test_policy_loss_argument_errors():
    x, w, a = torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1)
    with pytest.raises(ValueError, match="mode"):
        rl.policy_loss(x, a, w, x, mode="ppo")
    with pytest.raises(ValueError, match="old_logprobs"):
        rl.policy_loss(x, a, w, None, mode="grpo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        rl.policy_loss(x, a, w, x, mode="grpo", kl_beta=0.1)


# -----------------------------------------------------------------------------
# sampling from the policy itself: temperature and top-p
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [{"temperature": 0.7}, {"temperature": 1.3}, {"top_p": 0.9},
                                   {"algo": "grpo", "updates_per_batch": 4, "temperature": 0.5},
                                   {"algo": "grpo", "updates_per_batch": 4, "top_p": 0.95}])
def test_rollouts_that_would_not_sample_from_the_policy_are_refused_in_both_modes(flags):
    with pytest.raises(ValueError, match="temperature 1, top-p 1"):
        rl.RLConfig(**flags).validate()
    rl.RLConfig(**{**flags, "temperature": 1.0, "top_p": 1.0}).validate()     # the same, at 1


def test_the_sampler_log_probs_are_the_update_log_probs_only_at_temperature_1_without_top_p():
    """Why the rule: mimovl.sample_next reports the log-prob of the distribution it sampled
    from; at temperature 1 without top-p that is log_softmax(logits), the update's log pi."""
    from mimovl import sample_next
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0))
    policy = logits.log_softmax(-1)
    for kw, same in (({"temperature": 1.0}, True), ({"temperature": 0.7}, False),
                     ({"temperature": 1.0, "top_p": 0.8}, False)):
        tokens, lp = sample_next(logits, generator=torch.Generator().manual_seed(1),
                                 return_logprobs=True, **kw)
        assert torch.allclose(lp, policy.gather(-1, tokens[:, None])[:, 0], atol=1e-6) == same, kw


# -----------------------------------------------------------------------------
# dynamic sampling and the easy pool
# -----------------------------------------------------------------------------

def test_dynamic_sampling_keeps_only_groups_with_different_rewards():
    assert rollouts.has_signal([0, 1, 0]) and rollouts.has_signal([0.3, 0.4])
    assert not any(rollouts.has_signal(r) for r in ([1, 1, 1], [0.0, 0.0], [0.7, 0.7 + 1e-9]))


def test_easy_pool_moves_solved_prompts_and_redraws_them_at_its_rate():
    pool = rollouts.EasyPool(prob=0.1, seed=0)
    stream = iter([{"id": i} for i in range(10_000)] * 2)
    pool.update({"id": 0}, solved=True)
    pool.update({"id": 1}, solved=False)
    assert len(pool) == 1

    draws = [pool.draw(stream) for _ in range(2000)]
    easy = [p for p, from_easy in draws if from_easy]
    assert all(p == {"id": 0} for p in easy)
    assert 0.07 < len(easy) / len(draws) < 0.13                  # seeded; expectation 0.1
    assert {"id": 0} not in [p for p, from_easy in draws if not from_easy]   # skipped in stream

    pool.update({"id": 0}, solved=False)                         # no longer solved: back out
    assert len(pool) == 0 and pool.draw(iter([{"id": 0}])) == ({"id": 0}, False)


def test_easy_pool_edge_rates():
    always = rollouts.EasyPool(prob=1.0, seed=1)
    always.update({"id": "q"}, True)
    assert always.draw(iter([{"id": "other"}])) == ({"id": "q"}, True)
    never = rollouts.EasyPool(prob=0.0, seed=1)
    never.update({"id": "q"}, True)
    assert never.draw(iter([{"id": "q"}, {"id": "other"}])) == ({"id": "other"}, False)
    with pytest.raises(StopIteration):
        never.draw(iter([]))
    with pytest.raises(ValueError, match="probability"):
        rollouts.EasyPool(prob=1.5)


def test_a_group_is_solved_when_every_response_passes_as_the_metrics_count_it():
    """The easy pool and the pass-rate metric share rewards.passed: a box passes at clipped
    GIoU >= 0.5, a count only at reward 1."""
    def group(task, rewards):
        prompt = rollouts.rl_prompt(task, 0, "heldout")
        return rollouts.Group(prompt, {}, [rollouts.Response([1], [0.0], "", False, reward=r) for r in rewards])
    for task, rewards in (("ground_box", [0.6, 0.5, 0.9]), ("ground_box", [0.6, 0.4]),
                          ("count", [1.0, 1.0]), ("count", [1.0, 0.99])):
        g = group(task, rewards)
        assert g.solved == all(R.passed(R.reward_tag(g.prompt), r) for r in rewards)
    assert group("ground_box", [0.6, 0.5, 0.9]).solved and not group("count", [1.0, 0.99]).solved


# -----------------------------------------------------------------------------
# a real learning test: a toy policy learns to answer a fixed count
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["onpolicy", "grpo"])
def test_toy_policy_learns_to_count(mode):
    """A policy over two characters ("0"-"9", " ") is sampled, its answers are scored by the
    counting reward against 7, and it is updated with group advantages + policy_loss. It starts
    at an expected reward of 3/121 ("7 ", " 7" and "07" score) and must end above 0.9: the whole
    chain (reward -> advantages -> loss -> gradient sign) has to be right for that to happen."""
    torch.manual_seed(0)
    alphabet = list("0123456789 ")
    logits = torch.zeros(2, len(alphabet), requires_grad=True)     # (positions, vocab)
    opt = torch.optim.Adam([logits], lr=0.1)
    n_groups, G = 4, 8
    for step in range(80):
        with torch.no_grad():
            samples = torch.multinomial(torch.softmax(logits, -1).repeat(n_groups * G, 1, 1)
                                        .view(-1, len(alphabet)), 1).view(n_groups * G, 2)
        texts = ["".join(alphabet[k] for k in row) for row in samples.tolist()]
        rewards = [R.compute_reward("count", t, 7)[0] for t in texts]
        adv = rl.group_advantages(torch.tensor(rewards).view(n_groups, G)).view(-1).float()
        lp = torch.log_softmax(logits, -1)[torch.arange(2), samples]  # (n, 2)
        old = lp.detach()
        for _ in range(1 if mode == "onpolicy" else 2):               # vanilla: 2 updates/batch
            weights = rl.loss_weights(torch.full((n_groups, G), 2.0)).view(-1, 1).expand_as(lp)
            loss = rl.policy_loss(lp, adv, weights, old, mode=mode)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lp = torch.log_softmax(logits, -1)[torch.arange(2), samples]
    # the policy's expected reward, exactly, by enumerating all 121 answers
    probs = torch.softmax(logits.detach(), -1)
    expected_reward = sum(probs[0, a] * probs[1, b] * R.compute_reward(
        "count", alphabet[a] + alphabet[b], 7)[0] for a in range(11) for b in range(11))
    assert expected_reward > 0.9


def test_results_table_means_over_trained_and_all_tasks():
    """The before/after table: per-task changes and both means, computed by hand."""
    def res(**rewards):
        return {t: {"reward": r, "pass": r, "length": 3.0, "n": 4} for t, r in rewards.items()}
    sft, rl_ = res(count=0.5, ocr=0.25), res(count=0.75, ocr=0.0)
    sft_k, rl_k = res(count=0.4, ocr=0.2), res(count=0.6, ocr=0.2)
    table = evaluate.results_table(sft, rl_, res(count=0.25), ["count"], sft_k, rl_k, 4)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert rows["count"][:8] == ["count", "0.500", "0.750", "+0.250", "0.400", "0.600", "+0.200", "0.50"]
    assert rows["count"][-2:] == ["0.250", "yes"]
    assert rows["ocr"][-2:] == ["-", "no"]
    assert rows["**mean over trained tasks**"][1:7] == ["0.500", "0.750", "+0.250", "0.400", "0.600", "+0.200"]
    # all tasks: greedy (0.5 + 0.25) / 2 -> (0.75 + 0) / 2; avg@4 (0.4 + 0.2) / 2 -> (0.6 + 0.2) / 2
    assert rows["**mean over all tasks**"][1:7] == ["0.375", "0.375", "+0.000", "0.300", "0.400", "+0.100"]


def test_paired_bootstrap_of_the_greedy_change_by_hand():
    # count: every prompt goes 0 -> 1 (change +1, no spread); ocr: nothing changes (0, no spread);
    # caption is not a trained task and is ignored. Mean of the task means: (1 + 0) / 2
    before = [("count", 0.0), ("count", 0.0), ("ocr", 1.0), ("ocr", 0.0), ("caption", 0.0)]
    after = [("count", 1.0), ("count", 1.0), ("ocr", 1.0), ("ocr", 0.0), ("caption", 1.0)]
    assert rl.paired_bootstrap(before, after, ["count", "ocr"]) == (0.5, 0.5, 0.5)
    # one of four count prompts improves: change 1/4; resamples range over 0 .. 1
    before = [("count", 0.0)] * 4
    after = [("count", 1.0)] + [("count", 0.0)] * 3
    change, lo, hi = rl.paired_bootstrap(before, after, ["count"])
    assert change == 0.25 and lo == 0.0 and 0.5 <= hi <= 1.0


def test_select_tasks_by_hand():
    """A task is trained when the SFT model's (sampled) reward beats its no-image reward by more
    than min_gain; text-only tasks have no no-image baseline and are not chosen."""
    def res(**rewards):
        return {t: {"reward": r} for t, r in rewards.items()}
    sft = res(count=0.51, visual_math=0.08, caption=0.66, text_math=0.07)
    blank = res(count=0.22, visual_math=0.02, caption=0.49)
    tasks, why = rl.select_tasks(sft, blank, min_gain=0.1)
    assert tasks == ["count", "caption"]                  # gains 0.29, 0.06 (< 0.1), 0.17
    assert "text only" in why["text_math"] and "0.080 vs no-image 0.020" in why["visual_math"]
    assert rl.select_tasks(sft, blank, min_gain=0.2)[0] == ["count"]
