"""Tests of kernels.py: every Triton kernel, forward and backward, against a float64 reference.

Rule (as flash-attention's tests): the kernel's error against float64 must be at most twice the
error of the PyTorch reference run in the kernel's own dtype, plus a tiny floor (1e-5 of the
output's magnitude). Buffers the kernels allocate are poisoned with NaN, so an element a kernel
forgets to write fails the comparison.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before kernels.py is imported), so shapes are tiny; on a GPU machine the same tests run the
compiled kernels. Run:  python -m pytest tests/test_kernels.py
"""

import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("triton")  # no Triton wheel for this platform: there is no Triton path to test
import kernels as K  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def triton_runs_here():
    if DEVICE.type == "cpu" and not K.INTERPRET:
        pytest.fail("no GPU and kernels.py was imported without TRITON_INTERPRET=1 "
                    "(tests/conftest.py sets it; do not import kernels before pytest starts)")


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled tensors while the test runs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def check(name, got, ref64, ref_same_dtype, floor_rel=1e-5):
    """|got - ref64| <= 2 |ref_same_dtype - ref64| + floor (max over elements)."""
    got = got.detach().double().cpu()
    err = (got - ref64).abs().max().item()
    base = (ref_same_dtype.detach().double().cpu() - ref64).abs().max().item()
    floor = floor_rel * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + floor, (f"{name}: error {err:.3g} exceeds 2 x the same-dtype reference's "
                                     f"error {base:.3g} + {floor:.2g}")


def run_op(fn, inputs, grad_out, dtype, device):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. the float inputs."""
    xs = [x.detach().to(device=device, dtype=dtype if x.is_floating_point() else x.dtype) for x in inputs]
    xs = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
    out = fn(*xs)
    out.backward(grad_out.to(device=device, dtype=out.dtype))
    return [out] + [x.grad for x in xs if x.is_floating_point()]


def check_op(name, kernel_fn, ref_fn, inputs, grad_out, dtype, names):
    """Kernel vs reference in float64 (CPU) and in the kernel's dtype on the kernel's device."""
    inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]  # shared rounded inputs
    got = run_op(kernel_fn, inputs, grad_out, dtype, DEVICE)
    ref64 = run_op(ref_fn, inputs, grad_out, torch.float64, "cpu")
    ref_lp = run_op(ref_fn, inputs, grad_out, dtype, DEVICE)
    for n, g, r64, rlp in zip(names, got, ref64, ref_lp):
        assert g is not None and g.dtype == rlp.dtype, f"{name}: {n} missing or of dtype {g and g.dtype}"
        check(f"{name} {n}", g, r64.detach(), rlp)


# -----------------------------------------------------------------------------
# Varlen attention

def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


ATTENTION_CASES = {
    # name: (lens_q, lens_k, n_heads, n_kv_heads, head_dim, causal, dtype)
    "ragged_causal_gqa_d64_fp16": ([1, 37, 70], None, 4, 2, 64, True, torch.float16),
    "long_and_short_bidir_d80_fp32": ([70, 1, 5, 9, 3, 17], None, 2, 2, 80, False, torch.float32),
    "causal_gqa4_d128_bf16": ([45, 3, 33], None, 4, 1, 128, True, torch.bfloat16),
    "windows_bidir_d80_bf16": ([64, 64, 20], None, 2, 2, 80, False, torch.bfloat16),
    "kv_longer_causal_bottom_right_fp32": ([5, 33, 1], [20, 40, 9], 4, 2, 64, True, torch.float32),
    "kv_differs_bidir_fp32": ([7, 12], [30, 5], 2, 1, 64, False, torch.float32),
    "empty_segment_masked_dim72_fp16": ([10, 0, 20], None, 2, 2, 72, False, torch.float16),
}


def attention_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens_k = lens_k or lens_q
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, n_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(tk, n_kv, head_dim, generator=g).to(dtype)
    v = torch.randn(tk, n_kv, head_dim, generator=g).to(dtype)
    do = torch.randn(tq, n_heads, head_dim, generator=g).to(dtype)
    return q, k, v, do, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_varlen_attention_forward_backward(case, nan_empty, monkeypatch):
    lens_q, lens_k, n_heads, n_kv, head_dim, causal, dtype = ATTENTION_CASES[case]
    q, k, v, do, cu_q, cu_k, max_q, max_k = attention_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype)
    scale = head_dim ** -0.5

    def triton_fn(q, k, v):
        return K.varlen_attention(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k, causal)

    def torch_fn(q, k, v):
        return K.varlen_attention_torch(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k, causal, scale)

    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    check_op(case, triton_fn, torch_fn, [q, k, v], do, dtype, ["out", "dq", "dk", "dv"])


def test_varlen_attention_strided_views_and_block_sizes(nan_empty):
    """q/k/v as views of one packed qkv tensor (the ViT's layout), and GPU-sized 64x64 tiles."""
    lens = [70, 1, 64, 9]
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(sum(lens), 3, 2, 80, generator=g).to(DEVICE)
    do = torch.randn(sum(lens), 2, 80, generator=g)
    blocks = {p: K.AttnBlocks(64, 64, 4, 2) for p in ("fwd", "dkdv", "dq")}
    qkv.requires_grad_()
    q, k, v = qkv.unbind(1)  # (T, 2, 80) each, token stride 3*2*80
    out = K.varlen_attention_triton(q, k, v, cu(lens).to(DEVICE), cu(lens).to(DEVICE), 70, 70, False,
                                    80 ** -0.5, blocks=blocks)
    out.backward(do.to(DEVICE))
    qkv64 = qkv.detach().cpu().double().requires_grad_()
    ref = K.varlen_attention_torch(*qkv64.unbind(1), cu(lens), cu(lens), 70, 70, False, 80 ** -0.5)
    ref.backward(do.double())
    check("strided out", out, ref.detach(), ref.detach(), floor_rel=1e-5)
    check("strided dqkv", qkv.grad, qkv64.grad, qkv64.grad, floor_rel=1e-5)


def test_rows_that_see_no_key_output_zero(monkeypatch):
    """Causal, query longer than key: with bottom-right alignment the first rows see nothing;
    they output 0 and pass no gradient (flash-attention's convention)."""
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    q, k, v, do, cu_q, cu_k, max_q, max_k = attention_inputs([30, 3], [10, 3], 2, 2, 64, torch.float32)
    q, k, v = (x.to(DEVICE).requires_grad_() for x in (q, k, v))
    out = K.varlen_attention(q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE), max_q, max_k, causal=True)
    out.backward(do.to(DEVICE))
    assert torch.equal(out[:20].cpu(), torch.zeros(20, 2, 64))  # rows 0..19 of segment 0 see no key
    assert torch.equal(q.grad[:20].cpu(), torch.zeros(20, 2, 64))
    assert out[20:].abs().sum() > 0 and torch.isfinite(k.grad).all()


def test_tile_schedule_launches_only_real_tiles():
    """One 200-row segment plus fifty 3-row ones with 64-row tiles: 4 + 50 real tiles, not
    51 x 4; every real tile appears once, heaviest (longest key range) first."""
    lens = [200] + [3] * 50
    cu_q = cu(lens)
    seg, blk = K._tile_schedule(cu_q, cu_q, 200, sum(lens), 64, "q", causal=False)
    real = sorted((s, b) for s, b in zip(seg.tolist(), blk.tolist()) if s >= 0)
    assert real == [(0, b) for b in range(4)] + [(i, 0) for i in range(1, 51)]
    assert seg.numel() <= len(real) + len(lens)  # at most one empty program per segment
    assert seg[:4].tolist() == [0, 0, 0, 0]  # the 200-key tiles first
    causal_seg, causal_blk = K._tile_schedule(cu_q, cu_q, 200, sum(lens), 64, "q", causal=True)
    assert causal_seg[0].item() == 0 and causal_blk[0].item() == 3  # the last (widest) causal tile first
    # cached on the cu_seqlens tensor, rebuilt after an in-place change
    assert K._tile_schedule(cu_q, cu_q, 200, sum(lens), 64, "q", causal=True)[0] is causal_seg
    cu_q.copy_(cu([3] * 50 + [200]))  # the long segment is now the last one
    seg2, blk2 = K._tile_schedule(cu_q, cu_q, 200, sum(lens), 64, "q", causal=True)
    assert seg2 is not causal_seg and (seg2[0].item(), blk2[0].item()) == (50, 3)


def test_head_dim_split():
    assert K.split_head_dim(64) == (64, 0)
    assert K.split_head_dim(80) == (64, 16)  # no padding to 128
    assert K.split_head_dim(128) == (128, 0)
    assert K.split_head_dim(72) == (64, 16)  # 8 masked columns


# -----------------------------------------------------------------------------
# Fused ops

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 11, 96), (37, 1280)])
def test_rms_norm(shape, dtype, nan_empty, monkeypatch):
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(*shape, generator=g)
    check_op("rms_norm", lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: K.rms_norm_torch(x, w, 1e-6),
             [x, w], dy, dtype, ["y", "dx", "dw"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 128])
def test_apply_rotary(head_dim, dtype, nan_empty, monkeypatch):
    """Rotary on a strided view (q of a packed qkv) with arbitrary per-token cos/sin."""
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(13, 2, 3, head_dim, generator=g)
    angles = torch.randn(13, head_dim // 2, generator=g) * 5
    emb = torch.cat([angles, angles], -1)  # the model's layout: angles duplicated over both halves
    cos, sin = emb.cos(), emb.sin()
    dy = torch.randn(13, 3, head_dim, generator=g)

    def kernel(qkv, cos, sin):
        return K.apply_rotary(qkv[:, 0], cos.detach().to(qkv.device), sin.detach().to(qkv.device))

    def ref(qkv, cos, sin):
        return K.apply_rotary_torch(qkv[:, 0], cos.detach().to(qkv.device), sin.detach().to(qkv.device))

    check_op("apply_rotary", kernel, ref, [qkv, cos, sin], dy, dtype, ["y", "dqkv"])


def test_apply_rotary_general_cos_sin(monkeypatch):
    """cos/sin whose two halves differ (not from duplicated angles): the backward must use the
    transposed rotation, not the forward one with -sin."""
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 64, generator=g)
    cos, sin = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    dy = torch.randn(5, 2, 64, generator=g)
    got = run_op(lambda x: K.apply_rotary(x, cos.to(DEVICE), sin.to(DEVICE)), [x], dy, torch.float32, DEVICE)
    ref = run_op(lambda x: K.apply_rotary_torch(x, cos.double(), sin.double()), [x], dy, torch.float64, "cpu")
    for a, b in zip(got, ref):
        check("rotary general", a, b.detach(), b.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype, nan_empty, monkeypatch):
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    gate, up, dy = (torch.randn(7, 300, generator=g) * 3 for _ in range(3))
    check_op("swiglu", K.swiglu, K.swiglu_torch, [gate, up], dy, dtype, ["y", "dgate", "dup"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction,chunk_size", [("mean", None), ("sum", 16)])
def test_linear_cross_entropy(dtype, reduction, chunk_size, nan_empty, monkeypatch):
    """Vocabulary 1500 (two vocabulary blocks in the interpreter), ignored labels, and with
    chunk_size=16 three chunks of rows (dWeight accumulated across chunks)."""
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 48, generator=g)
    weight = torch.randn(1500, 48, generator=g) * 0.3
    labels = torch.randint(0, 1500, (37,), generator=g)
    labels[[0, 5, 6, 30]] = -100

    def kernel(h, w):
        return K.linear_cross_entropy(h, w, labels.to(h.device), reduction=reduction, chunk_size=chunk_size)

    def ref(h, w):
        return K.linear_cross_entropy_torch(h, w, labels.to(h.device), reduction=reduction)

    check_op("linear_cross_entropy", kernel, ref, [hidden, weight], torch.tensor(1.7), dtype,
             ["loss", "dhidden", "dweight"])


def test_linear_cross_entropy_torch_path_is_chunked_and_exact(monkeypatch):
    """The PyTorch path (CPU default) walks chunks of rows with recomputation; loss and both
    gradients equal the one-shot definition, and no chunk's logits exceed chunk_size rows."""
    monkeypatch.setenv("MIMOVL_KERNELS", "torch")
    g = torch.Generator().manual_seed(4)
    h = torch.randn(37, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 24, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 300, (37,), generator=g)
    labels[[1, 2, 20]] = -100
    seen = []
    real_ce = K._ce_chunk_torch
    monkeypatch.setattr(K, "_ce_chunk_torch", lambda hh, ww, y, ii: seen.append(hh.shape[0]) or real_ce(hh, ww, y, ii))
    for reduction in ("sum", "mean"):
        got = K.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=8)
        dh, dw = torch.autograd.grad(got, (h, w))
        ref = K.linear_cross_entropy_torch(h, w, labels, reduction=reduction)
        rh, rw = torch.autograd.grad(ref, (h, w))
        assert abs(got.item() - ref.item()) <= 1e-12 * abs(ref.item())
        assert (dh - rh).abs().max() <= 1e-12 and (dw - rw).abs().max() <= 1e-12
    assert seen and max(seen) <= 8


def test_linear_cross_entropy_rejects_bad_labels(monkeypatch):
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        K.linear_cross_entropy(h, w, torch.tensor([1, 2, 10, -100], device=DEVICE))


def test_linear_cross_entropy_without_grad(monkeypatch):
    """Under no_grad the kernel skips the gradient pass; the loss is unchanged."""
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(9, 16, generator=g), torch.randn(100, 16, generator=g)
    labels = torch.randint(0, 100, (9,), generator=g)
    with torch.no_grad():
        got = K.linear_cross_entropy(h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE))
    ref = K.linear_cross_entropy_torch(h.double(), w.double(), labels)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())


# -----------------------------------------------------------------------------
# Dispatch

def test_dispatch_rule(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.delenv("MIMOVL_KERNELS", raising=False)
    assert K._use_triton(x) is False  # CPU tensors: PyTorch path
    monkeypatch.setenv("MIMOVL_KERNELS", "torch")
    assert K._use_triton(x) is False
    monkeypatch.setenv("MIMOVL_KERNELS", "triton")
    if K.INTERPRET:
        assert K._use_triton(x) is True  # forced: the interpreter runs it on the CPU
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            K._use_triton(x)
    monkeypatch.setenv("MIMOVL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MIMOVL_KERNELS"):
        K._use_triton(x)


def test_one_loud_warning_when_cuda_has_no_triton(monkeypatch):
    monkeypatch.delenv("MIMOVL_KERNELS", raising=False)
    monkeypatch.setattr(K, "triton", None)
    monkeypatch.setattr(K, "TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"))
    monkeypatch.setattr(K, "_warned_no_triton", False)
    cuda_tensor = types.SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor
    with pytest.warns(RuntimeWarning, match="Triton path is unusable"):
        assert K._use_triton(cuda_tensor) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert K._use_triton(cuda_tensor) is False


# -----------------------------------------------------------------------------
# The model with every kernel forced to Triton matches the PyTorch path

def test_tiny_model_triton_path_matches_torch_path(monkeypatch):
    """Tiny MiMo-VL in fp32, two packed documents (one with an image: window and full ViT
    attention): logits, loss and every parameter's gradient with MIMOVL_KERNELS=triton vs =torch."""
    mimovl = pytest.importorskip("mimovl")  # the model (issue: model core) is not in this checkout yet

    cfg = mimovl.MiMoVLConfig.preset("tiny")
    torch.manual_seed(0)
    model = mimovl.MiMoVL(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(12, cfg.text.vocab_size, (n,), generator=g).tolist()

    grid = torch.tensor([[1, 8, 12]])  # 8x12 patches: two 64-patch windows (one partial)
    n_image_tokens = 8 * 12 // 4
    doc1 = text(3) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens + \
        [cfg.vision_end_token_id] + text(4)
    doc2 = text(9)
    ids = torch.tensor([doc1 + doc2], device=DEVICE)
    cu_seqlens = torch.tensor([0, len(doc1), len(doc1) + len(doc2)], dtype=torch.int32, device=DEVICE)
    pv = torch.randn(8 * 12, 1176, generator=g)
    weights = torch.randn(1, ids.shape[1], cfg.text.vocab_size, generator=g).to(DEVICE)
    labels = ids.clone()
    labels[0, :5] = -100

    def run(path):
        """Logits, loss, and every parameter's gradient of <logits, weights> + loss."""
        monkeypatch.setenv("MIMOVL_KERNELS", path)
        model.zero_grad(set_to_none=True)
        kw = dict(pixel_values=pv.to(DEVICE), image_grid_thw=grid, cu_seqlens=cu_seqlens)
        logits = model(ids, **kw).logits
        (logits * weights).sum().backward()  # a fixed random projection reaches every parameter
        loss = model(ids, labels=labels, **kw).loss
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                if p.grad is not None}

    logits_torch, loss_torch, grads_torch = run("torch")
    logits_triton, loss_triton, grads_triton = run("triton")
    assert (logits_triton - logits_torch).abs().max() <= 1e-4 * logits_torch.abs().max()
    assert abs(loss_triton - loss_torch) <= 1e-5 * loss_torch
    assert grads_triton.keys() == grads_torch.keys() and len(grads_torch) > 0
    for name, ref in grads_torch.items():
        err = (grads_triton[name] - ref).abs().max()
        assert err <= 1e-4 * ref.abs().max() + 1e-7, f"gradient of {name}: max error {err:.3g}"


# -----------------------------------------------------------------------------
# The GPU benchmark's dry mode (tiny shapes, interpreter) so that it cannot rot

def run_bench(tmp_path, *flags, interpret):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", MIMOVL_KERNELS="")
    r = subprocess.run([sys.executable, "bench.py", *flags, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bench_gpu_dry_run(tmp_path):
    """Every section of `bench.py --gpu` on tiny shapes; the Triton rows pass the accuracy rule."""
    rows = run_bench(tmp_path, "--gpu", "--dry", interpret=True)
    ours = [row for row in rows if row.get("impl") == "triton"]
    assert {row["section"] for row in ours} == {"attention", "fused_ops"}
    assert len(ours) == 4 * 2 + 4 * 2 and all(row.get("ok") is True for row in ours), ours
    assert any(row["section"] == "vit_tower" and "ms" in row for row in rows)


def test_kernels_compile_for_hopper(tmp_path):
    """Each kernel compiles for sm_90 (the interpreter cannot catch GPU-only compile errors)."""
    rows = [row for row in run_bench(tmp_path, "--compile-sm90", "--dry", interpret=False)
            if row["section"] == "compile"]
    assert len(rows) >= 10 and all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


def test_cpu_packed_linear_weights(tmp_path):
    """Inference with oneDNN-packed bf16 weights gives the same logits as the plain bf16 model
    (within bf16 rounding) and the packed model refuses to be saved."""
    from mimovl import MiMoVL, MiMoVLConfig
    if not K.cpu_pack_supported():
        pytest.skip("this CPU / PyTorch build has no oneDNN bf16 linear (nothing is packed there)")
    torch.manual_seed(0)
    model = MiMoVL(MiMoVLConfig.preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.randint(10, 1000, (1, 40))
    pv, grid = torch.randn(64, 1176), torch.tensor([[1, 8, 8]])
    ids[0, 5:21] = model.cfg.image_token_id
    with torch.no_grad():
        ref = model(ids, pixel_values=pv, image_grid_thw=grid).logits
        n = K.pack_linear_weights_for_cpu(model)
        got = model(ids, pixel_values=pv, image_grid_thw=grid).logits
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match="prepared for CPU inference"):
        model.save_pretrained(tmp_path)
