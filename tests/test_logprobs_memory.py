"""MiMoVL.token_logprobs, the per-token log-probabilities RL trains on: values, gradients and
entropies equal those computed from the full (B, L, vocab) logits for packed rows (cu_seqlens)
and padded batches, at chunk sizes that split the labelled tokens evenly and unevenly; and what
autograd keeps between forward and backward is at most one chunk's (rows, vocab) tensor, not one
per chunk, so a response of several thousand tokens does not hold gigabytes of log-softmax.

A tiny random fp32 model (mimovl.tiny_config: 4 layers, width 256, vocabulary 1024) on one CPU
thread; each test takes a fraction of a second.
"""

import pytest
import torch

from mimovl import MiMoVL, tiny_config

VOCAB = tiny_config().text.vocab_size


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MiMoVL(tiny_config())
    with torch.no_grad():   # a sharper head than the 0.02 init, so log-probs and entropies vary
        m.lm_head.weight.normal_(std=0.3)
    return m


def packed_batch():
    """One (1, 24) row of three documents (cu_seqlens); in each, a prompt then a response whose
    tokens are labelled, with a -100 hole inside the second response; 12 labelled tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, VOCAB, (1, 24), generator=g)
    labels = torch.full_like(ids, -100)
    for a, e in ((3, 8), (11, 17), (20, 24)):
        labels[0, a:e] = ids[0, a:e]
    labels[0, 13] = -100
    return ids, labels, dict(cu_seqlens=torch.tensor([0, 8, 18, 24]))


def padded_batch():
    """Two left-padded rows of 11 and 15 tokens; the last 5 and 6 tokens labelled."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, VOCAB, (2, 15), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :10] = -100
    labels[1, :9] = -100
    return ids, labels, dict(attention_mask=mask)


BATCHES = {"packed": packed_batch, "padded": padded_batch}


def reference(model, ids, labels, inputs):
    """Log-probs and entropies from the full logits: token t scored by position t-1."""
    logp = model(ids, return_logits=True, **inputs).logits.log_softmax(-1)     # (B, L, V)
    sel = labels != -100
    lp = torch.zeros(ids.shape)
    lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ent = torch.zeros(ids.shape)
    ent[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1]
    return lp * sel, (ent * sel).detach()


def grads_of(model, lp, weights):
    model.zero_grad(set_to_none=True)
    (lp * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("chunk", [1, 5, 12, 64, None])   # 5 splits the 12 (and 11) tokens unevenly
def test_values_gradients_and_entropy_equal_the_full_logits(model, batch, chunk):
    ids, labels, inputs = BATCHES[batch]()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    ref_lp, ref_ent = reference(model, ids, labels, inputs)
    ref_grads = grads_of(model, ref_lp, weights)

    lp, ent = model.token_logprobs(ids, labels, with_entropy=True, chunk=chunk, **inputs)
    assert lp.shape == ent.shape == ids.shape
    assert ((lp != 0) == (labels != -100)).all() and ((ent != 0) == (labels != -100)).all()
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad
    grads = grads_of(model, lp, weights)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads and "model.embed_tokens.weight" in grads
    for name in grads:   # fp32 rounding of different matmul shapes, relative to the gradient's scale
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-5 * scale, msg=name)
    # the entropy does not change the log-probs
    assert torch.equal(model.token_logprobs(ids, labels, chunk=chunk, **inputs), lp)


@pytest.mark.parametrize("batch", BATCHES)
def test_autograd_keeps_at_most_one_chunk_of_vocab_sized_tensors(model, batch):
    ids, labels, inputs = BATCHES[batch]()
    chunk = 4                                   # 12 (11) labelled tokens: 3 chunks
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):   # per-token tensors only: lm_head.weight.T is (hidden, vocab) too
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = model.token_logprobs(ids, labels, chunk=chunk, **inputs)
    vocab_rows = [s for s in saved if len(s) >= 2 and s[-1] == VOCAB]
    assert all(s[0] <= chunk for s in vocab_rows), vocab_rows
    assert sum(torch.Size(s).numel() for s in vocab_rows) <= chunk * VOCAB, vocab_rows
    lp.sum().backward()                         # what was not kept is recomputed
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_no_grad_callers_do_not_checkpoint(model, monkeypatch):
    ids, labels, inputs = packed_batch()
    with_grad = model.token_logprobs(ids, labels, chunk=5, **inputs).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("activation checkpointing under torch.no_grad")
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():
        lp, ent = model.token_logprobs(ids, labels, with_entropy=True, chunk=5, **inputs)
    assert torch.equal(lp, with_grad)


def test_a_chunk_below_one_is_refused(model):
    ids, labels, inputs = packed_batch()
    with pytest.raises(ValueError, match="chunk=0 must be a positive number"):
        model.token_logprobs(ids, labels, chunk=0, **inputs)
