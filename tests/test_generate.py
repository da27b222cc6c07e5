"""Generation engine: greedy tokens identical to transformers 4.57 `generate`, KV-cache logits equal
to a full recompute, and the sampling controls (seed, top-k, top-p, stop tokens, n samples)."""

import pytest
import torch

from mimovl import MiMoVL, sample_next
from reference import hf_model, pixels, sequence


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(seed=11)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, MiMoVL.from_pretrained(path)


def prompt(parts, seed):
    g = torch.Generator().manual_seed(seed)
    ids, imgs, vids = sequence(parts, g)
    pv, ig = pixels(imgs, g)
    pvv, vg = pixels(vids, g)
    kw = {k: v for k, v in dict(pixel_values=pv, image_grid_thw=ig, pixel_values_videos=pvv, video_grid_thw=vg,
                                second_per_grid_ts=torch.tensor([1.0]) if vids else None).items() if v is not None}
    return ids, kw


@pytest.mark.parametrize("parts", [[9], [3, ("image", (1, 10, 14)), 4], [2, ("video", (3, 6, 8)), 5]],
                         ids=["text", "image", "video"])
def test_greedy_matches_transformers(pair, parts):
    hf, ours = pair
    ids, kw = prompt(parts, 1)
    x = torch.tensor([ids])
    ref = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kw)[:, x.shape[1]:]
    out = ours.generate(x, max_new_tokens=32, temperature=0.0, stop_token_ids=[], **kw)
    assert torch.equal(out, ref)


def test_greedy_batch_with_padding_matches_transformers(pair):
    hf, ours = pair
    a, kwa = prompt([3, ("image", (1, 8, 12)), 6], 2)
    b, kwb = prompt([2, ("image", (1, 10, 10)), 2], 3)
    L = max(len(a), len(b))
    ids = torch.tensor([[0] * (L - len(a)) + a, [0] * (L - len(b)) + b])
    mask = (torch.arange(L)[None] >= torch.tensor([[L - len(a)], [L - len(b)]])).long()
    kw = dict(pixel_values=torch.cat([kwa["pixel_values"], kwb["pixel_values"]]),
              image_grid_thw=torch.cat([kwa["image_grid_thw"], kwb["image_grid_thw"]]))
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0, **kw)[:, L:]
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=32, stop_token_ids=[], **kw)
    assert torch.equal(out, ref)


def test_cached_logits_equal_full_recompute(pair):
    _, ours = pair
    ids, kw = prompt([3, ("image", (1, 10, 14)), 2, ("video", (2, 4, 4)), 3], 4)
    x = torch.tensor([ids])
    new, logprobs = ours.generate(x, max_new_tokens=12, stop_token_ids=[], return_logprobs=True, **kw)
    full = torch.cat([x, new], dim=1)
    with torch.no_grad():
        logits = ours(full, **kw).logits[0, len(ids) - 1:-1]          # predictions of the 12 new tokens
    ref_lp = logits.log_softmax(-1).gather(-1, new[0][:, None])[:, 0]
    assert (logprobs[0] - ref_lp).abs().max() <= 1e-4
    # compare whole logit vectors step by step through the streaming generator
    steps = list(ours.stream_generate(x, max_new_tokens=12, stop_token_ids=[], **kw))
    assert torch.equal(torch.stack([s[0][0] for s in steps]), new[0])
    assert torch.equal(logits.argmax(-1), new[0])


def test_n_samples_share_prefill_and_seed_reproduces(pair):
    _, ours = pair
    ids, kw = prompt([3, ("image", (1, 8, 8)), 3], 5)
    x = torch.tensor([ids, ids])
    a = ours.generate(x, max_new_tokens=10, temperature=1.0, seed=7, n=3, stop_token_ids=[], **{
        "pixel_values": torch.cat([kw["pixel_values"]] * 2), "image_grid_thw": torch.cat([kw["image_grid_thw"]] * 2)})
    b = ours.generate(x, max_new_tokens=10, temperature=1.0, seed=7, n=3, stop_token_ids=[], **{
        "pixel_values": torch.cat([kw["pixel_values"]] * 2), "image_grid_thw": torch.cat([kw["image_grid_thw"]] * 2)})
    assert a.shape == (6, 10)
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1        # samples differ at temperature 1


def test_stop_tokens(pair):
    _, ours = pair
    ids, kw = prompt([6], 6)
    x = torch.tensor([ids])
    free = ours.generate(x, max_new_tokens=8, stop_token_ids=[])
    stop = int(free[0, 2])
    out = ours.generate(x, max_new_tokens=8, stop_token_ids=[stop])
    first = free[0].tolist().index(stop)
    assert out.shape[1] == first + 1                       # stops right after the stop token
    assert torch.equal(out[0], free[0, :first + 1])


def test_prompt_longer_than_context(pair):
    _, ours = pair
    x = torch.randint(12, 200, (1, 20))
    with pytest.raises(ValueError, match="exceeds the context"):
        ours.generate(x, max_new_tokens=ours.cfg.text.max_position_embeddings)


def test_sampling_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    # top-k 2: only tokens 0 and 1 ever appear, in ratio 5:3
    draws = torch.cat([sample_next(logits, 1.0, 2, 1.0, g)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    # top-p 0.75: the smallest prefix reaching 0.75 is {0, 1}
    draws = torch.cat([sample_next(logits, 1.0, 0, 0.75, g)[0] for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    # top-p 0.45 keeps only the first token; its logprob under the filtered distribution is 0
    tok, lp = sample_next(logits, 1.0, 0, 0.45, g, return_logprobs=True)
    assert tok.item() == 0 and abs(lp.item()) < 1e-6
    # greedy logprob is the plain log-softmax
    tok, lp = sample_next(logits, 0.0, return_logprobs=True)
    assert tok.item() == 0 and abs(lp.item() - torch.log(torch.tensor(0.5)).item()) < 1e-6


def test_token_logprobs_match_full_logits(pair):
    _, ours = pair
    a, kwa = prompt([3, ("image", (1, 8, 8)), 5], 8)
    b, _ = prompt([4], 9)
    L = max(len(a), len(b))
    ids = torch.tensor([[0] * (L - len(a)) + a, [0] * (L - len(b)) + b])
    mask = (torch.arange(L)[None] >= torch.tensor([[L - len(a)], [L - len(b)]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : L - 3] = -100                       # only the last 3 tokens of each row are "response"
    lp, ent = ours.token_logprobs(ids, labels, with_entropy=True, attention_mask=mask, chunk=2, **kwa)
    with torch.no_grad():
        logp = ours(ids, attention_mask=mask, **kwa).logits.log_softmax(-1)
    ref = torch.zeros_like(lp)
    ref[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]     # token t scored by position t-1
    ref = ref.masked_fill(labels == -100, 0.0)
    assert (lp - ref).abs().max() <= 1e-5
    assert ((lp != 0) == (labels != -100)).all()
    ref_ent = torch.zeros_like(lp)
    ref_ent[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1]
    sel = labels != -100
    assert (ent[sel] - ref_ent[sel]).abs().max() <= 1e-4


def test_prepare_for_cpu_inference_keeps_outputs(tmp_path):
    """Fusing q/k/v and gate/up (and packing in bf16) changes no result: fp32 logits equal, greedy
    tokens identical; the prepared model refuses to be saved."""
    hf = hf_model(seed=12)
    hf.save_pretrained(tmp_path / "hf")
    plain, fused = MiMoVL.from_pretrained(tmp_path / "hf"), MiMoVL.from_pretrained(tmp_path / "hf")
    assert fused.prepare_for_cpu_inference() == 0            # fp32: fused, nothing to pack
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n, _ in fused.named_parameters())
    ids, kw = prompt([3, ("image", (1, 8, 10)), 4], 13)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (plain(x, **kw).logits - fused(x, **kw).logits).abs().max() <= 1e-5
    assert torch.equal(plain.generate(x, max_new_tokens=16, stop_token_ids=[], **kw),
                       fused.generate(x, max_new_tokens=16, stop_token_ids=[], **kw))
    with pytest.raises(ValueError, match="prepared for CPU inference"):
        fused.save_pretrained(tmp_path / "out")
