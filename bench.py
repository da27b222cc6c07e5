"""
bench.py — how fast, and how right, the hot paths are.

    python bench.py --gpu                           # one NVIDIA GPU (H100/H200), about 4-5 minutes
    python bench.py --gpu --out runs/bench-gpu.jsonl --budget-s 270
    python bench.py --gpu --sweep                   # also time other attention block sizes
    python bench.py --gpu --dry                     # CPU, tiny shapes, Triton interpreter (CI runs
                                                    # this so the GPU script cannot rot; numbers meaningless)
    python bench.py --compile-sm90                  # any machine: compile every kernel for Hopper, report
                                                    # registers / spills / shared memory (CI runs this)
    python bench.py --cpu --budget-s 3000           # this CPU (2 threads): our engine vs transformers 4.57
    python bench.py --cpu --dry                     # tiny shapes: checks the CPU group runs (CI runs this)

GPU group (one function per benchmark below; every peer is optional: a missing or failing one is
reported in its row, never fatal):

  gemm_peak   bf16 matmul TFLOP/s, the ceiling attention is compared with ("frac_peak").
  attention   kernels.varlen_attention_triton against torch.nn.attention.varlen.varlen_attn (FA2),
              SDPA flash / cuDNN / efficient on the padded equivalent, and FlexAttention with a
              document mask (compiled, run last because compiling it is slow). Shapes: the LM's
              (32 query / 8 KV heads, dim 128, 8K tokens, causal) as one document and as several,
              the ViT's (16 heads, dim 80) as 64-patch windows and as full attention over 1 MP images.
              Forward and forward+backward. FLOPs are counted per segment: 4 * head_dim * heads * (visible
              query-key pairs), x3.5 for forward+backward (FlashAttention's convention), so padding
              and masked-out pairs count for nothing. Every variant's output and gradients are
              compared with an fp32 reference: `ok` means error <= 2x that of PyTorch's per-segment
              SDPA in bf16 (+ 1e-3 of the output magnitude).
  fused_ops   RMSNorm, rotary, SwiGLU, linear+cross-entropy (vocab 151,680): Triton vs the PyTorch
              reference, time, peak extra memory and error.
  vit_tower   the MiMo-VL-7B ViT (32 blocks, 1280 wide) forward+backward on a 1 MP image against
              transformers' Qwen2.5-VL vision tower with the same weights.
  memory      training.memory_estimate_gib against torch.cuda.max_memory_allocated over one real
              pre-training step (FSDP2 in a one-process group, gradient checkpointing, bf16
              autocast, chunked cross-entropy, AdamW) for stages 1-4 at the paper's row lengths, on
              MiMo-VL-7B's widths cut to 2 LM layers and 2 ViT blocks; every term of the estimate
              is in the row. --dry takes the same steps on the tiny config and measures nothing.
  sweep       (--sweep) alternative attention block sizes on the LM shape.

Compile group (--compile-sm90, no GPU needed): every kernel variant the GPU group launches is
compiled for sm_90 with Triton's own ptxas; a row per variant with registers per thread, spill
(stack) bytes and shared memory. The interpreter cannot catch code that only fails to compile
for a GPU; this does (with the Triton installed here, which may differ from the GPU machine's).

Every row is printed and appended to --out as one JSON object per line as soon as it is measured,
so a run cut short by --budget-s (or a crash) still leaves everything measured so far.
Row fields: section, case, impl, pass, ms, tflops, frac_peak, err, ok, note (and section extras).
"""

import os
import sys

# The Triton interpreter is switched on or off before triton is imported (by kernels): --dry runs
# the kernels on the CPU through it; --compile-sm90 needs the real compiler.
if "--compile-sm90" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"
elif "--dry" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels as K  # noqa: E402


# -----------------------------------------------------------------------------
# Bookkeeping: rows, timing, the time budget

@dataclass
class Bench:
    device: torch.device
    dry: bool
    out_path: str
    deadline: float
    peak_tflops: float = None
    rows: list = field(default_factory=list)

    def time_left(self):
        return self.deadline - time.time()

    def record(self, **row):
        row = {k: v for k, v in row.items() if v is not None}
        self.rows.append(row)
        with open(self.out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(_format_row(row), flush=True)
        return row


def _format_row(row):
    cols = [f"{row.get('section', ''):<10}", f"{row.get('case', ''):<28}", f"{row.get('impl', ''):<16}",
            f"{row.get('pass', ''):<8}"]
    cols.append(f"{row['ms']:9.3f} ms" if "ms" in row else " " * 12)
    cols.append(f"{row['tflops']:7.1f} TF/s" if "tflops" in row else " " * 12)
    cols.append(f"{row['frac_peak']:5.2f}" if "frac_peak" in row else " " * 5)
    cols.append(f"err {row['err']:.2e}" if "err" in row else " " * 12)
    cols.append({True: "ok ", False: "BAD", None: "   "}[row.get("ok")])
    extra = {k: v for k, v in row.items() if k not in ("section", "case", "impl", "pass", "ms", "tflops",
                                                       "frac_peak", "err", "ok")}
    return " ".join(cols) + ("  " + json.dumps(extra) if extra else "")


def measure(fn, bench, target_ms=100.0):
    """(median milliseconds per call, result of the last call). On a GPU the first call compiles
    and is not timed, then calls repeat until ~target_ms is spent (3..50 calls), each timed with
    CUDA events. On the CPU (--dry) one call, timed (interpreter numbers mean nothing)."""
    if bench.device.type != "cuda":
        t0 = time.perf_counter()
        result = fn()
        return (time.perf_counter() - t0) * 1e3, result
    result = fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(3, min(50, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        result = fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), result


def max_err(got, ref):
    return (got.detach().float() - ref.detach().float()).abs().max().item()


def within_rule(err, base_err, ref):
    """The tests' rule: error <= 2x that of the same-dtype PyTorch reference, plus a floor."""
    return bool(err <= 2 * base_err + 1e-3 * max(1.0, ref.detach().float().abs().max().item()))


class forced_kernels:
    """with forced_kernels("triton"): ... -- sets MIMOVL_KERNELS for the block, restores it after."""

    def __init__(self, path):
        self.path, self.saved = path, None

    def __enter__(self):
        self.saved = os.environ.get("MIMOVL_KERNELS")
        os.environ["MIMOVL_KERNELS"] = self.path

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("MIMOVL_KERNELS", None)
        else:
            os.environ["MIMOVL_KERNELS"] = self.saved


def _describe(exc):
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


# -----------------------------------------------------------------------------
# gemm_peak

def bench_gemm_peak(bench):
    n = 8192 if not bench.dry else 256
    a = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    ms, _ = measure(lambda: a @ b, bench, target_ms=300)
    bench.peak_tflops = 2 * n ** 3 / ms / 1e9
    bench.record(section="gemm_peak", case=f"bf16 {n}x{n}x{n}", impl="torch.matmul", ms=ms,
                 tflops=bench.peak_tflops)


# -----------------------------------------------------------------------------
# attention

@dataclass
class AttnCase:
    name: str
    lens: list  # segment lengths (query = key)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool


def attention_cases(dry):
    if dry:
        return [AttnCase("lm_1doc", [70], 4, 1, 128, True),
                AttnCase("lm_docs", [40, 30, 6], 4, 1, 128, True),
                AttnCase("vit_windows", [64] * 2, 2, 2, 80, False),
                AttnCase("vit_full", [48, 48], 2, 2, 80, False)]
    docs = [3000, 1800, 1200, 900, 600, 400, 200, 92]  # 8192 tokens, ragged
    # a 1 MP image at the ViT's resolution: 1008 x 1008 px = 72 x 72 patches = 81 full windows
    return [AttnCase("lm_8k_1doc", [8192], 32, 8, 128, True),
            AttnCase("lm_8k_8docs", docs, 32, 8, 128, True),
            AttnCase("vit_4x1MP_windows", [64] * (81 * 4), 16, 16, 80, False),
            AttnCase("vit_4x1MP_full", [72 * 72] * 4, 16, 16, 80, False)]


def attention_flops(case):
    """Forward FLOPs over the visible query-key pairs of every segment."""
    pairs = sum(n * (n + 1) // 2 if case.causal else n * n for n in case.lens)
    return 4 * case.head_dim * case.n_heads * pairs


@dataclass
class Impl:
    """One attention implementation in its own layout. inputs(q, k, v) makes leaf tensors from
    packed (T, heads, D) ones; run(*inputs) -> output in that layout; packed(x) maps a q-like or
    kv-like tensor of that layout back to packed (T, heads, D) for comparison."""
    name: str
    inputs: callable
    run: callable
    packed: callable
    note: str = None


def _leaves(*xs):
    return tuple(x.detach().clone().requires_grad_() for x in xs)


def _padding_index(lens, device):
    """Flat positions (in a (n_seg * max_len) padded layout) of the packed tokens."""
    max_len = max(lens)
    return torch.cat([torch.arange(n, device=device) + i * max_len for i, n in enumerate(lens)]), max_len


def attention_impls(case, bench, with_flex):
    dev = bench.device
    cu = torch.tensor([0] + torch.tensor(case.lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    max_len, scale = max(case.lens), case.head_dim ** -0.5
    impls = [Impl("triton", _leaves, lambda q, k, v: K.varlen_attention_triton(
        q, k, v, cu, cu, max_len, max_len, case.causal, scale), lambda x: x)]

    # torch.nn.attention.varlen.varlen_attn (FA2 kernels); its keyword set changed across releases
    try:
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        kw = {}
        if case.causal:
            kw.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
        gqa_repeat = case.n_heads != case.n_kv_heads and "enable_gqa" not in params
        if case.n_heads != case.n_kv_heads and not gqa_repeat:
            kw["enable_gqa"] = True
        if "scale" in params:
            kw["scale"] = scale
        group = case.n_heads // case.n_kv_heads

        def run_varlen(q, k, v):
            if gqa_repeat:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
        impls.append(Impl("varlen_attn", _leaves, run_varlen, lambda x: x,
                          "kv repeated (no enable_gqa)" if gqa_repeat else None))
    except Exception as exc:  # noqa: BLE001 - reported as a row
        impls.append(_unavailable("varlen_attn", exc))

    # SDPA backends on the padded (n_segments, heads, max_len, D) equivalent; with ragged causal
    # documents `is_causal` alone is exact for the real rows (padded keys come after them).
    idx, max_len_pad = _padding_index(case.lens, dev)
    n_seg = len(case.lens)

    def to_padded(x):
        buf = x.new_zeros(n_seg * max_len_pad, *x.shape[1:])
        buf[idx] = x
        return buf.view(n_seg, max_len_pad, *x.shape[1:]).transpose(1, 2).contiguous()

    def from_padded(x):
        return x.transpose(1, 2).reshape(n_seg * max_len_pad, *x.shape[1:2], x.shape[-1])[idx]

    try:
        if len(set(case.lens)) > 1 and not case.causal:
            raise ValueError("ragged bidirectional segments would need a padding mask")
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
        for name, backend in backends.items():
            def run_sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale,
                                                          enable_gqa=case.n_heads != case.n_kv_heads)
            impls.append(Impl(name, lambda q, k, v: _leaves(to_padded(q), to_padded(k), to_padded(v)),
                              run_sdpa, from_padded, f"padded to {n_seg} x {max_len_pad}"))
    except Exception as exc:  # noqa: BLE001
        impls.append(_unavailable("sdpa", exc))

    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            doc = torch.repeat_interleave(torch.arange(n_seg, device=dev),
                                          torch.tensor(case.lens, device=dev))  # (T,) document id

            def mask_mod(b, h, q_idx, kv_idx):
                same = doc[q_idx] == doc[kv_idx]
                return same & (q_idx >= kv_idx) if case.causal else same
            total = sum(case.lens)
            block_mask = create_block_mask(mask_mod, None, None, total, total, device=str(dev))
            flex = torch.compile(flex_attention) if dev.type == "cuda" else flex_attention

            def run_flex(q, k, v):
                return flex(q, k, v, block_mask=block_mask, scale=scale,
                            enable_gqa=case.n_heads != case.n_kv_heads)
            impls.append(Impl("flex_attention",
                              lambda q, k, v: _leaves(*(x.transpose(0, 1)[None].contiguous() for x in (q, k, v))),
                              run_flex, lambda x: x[0].transpose(0, 1),
                              "torch.compile" if dev.type == "cuda" else "eager"))
        except Exception as exc:  # noqa: BLE001
            impls.append(_unavailable("flex_attention", exc))
    return impls


def _unavailable(name, exc):
    return Impl(name, None, None, None, f"unavailable: {_describe(exc)}")


def attention_reference(case, q, k, v, do, dtype):
    """Per-segment SDPA (kernels.varlen_attention_torch) in `dtype`: output and dq, dk, dv."""
    cu = torch.tensor([0] + torch.tensor(case.lens).cumsum(0).tolist(), dtype=torch.int32, device=q.device)
    q, k, v = _leaves(q.to(dtype), k.to(dtype), v.to(dtype))
    out = K.varlen_attention_torch(q, k, v, cu, cu, max(case.lens), max(case.lens), case.causal,
                                   case.head_dim ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return [out.detach(), *grads]


def bench_attention(bench, with_flex=False, only_flex=False):
    dtype = torch.bfloat16
    for case in attention_cases(bench.dry):
        margin = 0 if bench.dry else 90 if only_flex else 60  # compiling FlexAttention takes a while
        if bench.time_left() < margin:
            bench.record(section="attention", case=case.name, note="skipped: time budget")
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        total = sum(case.lens)
        q, do = (torch.randn(total, case.n_heads, case.head_dim, generator=g).to(bench.device, dtype)
                 for _ in range(2))
        k, v = (torch.randn(total, case.n_kv_heads, case.head_dim, generator=g).to(bench.device, dtype)
                for _ in range(2))
        ref32 = attention_reference(case, q, k, v, do, torch.float32)
        ref16 = attention_reference(case, q, k, v, do, dtype)
        base = [max_err(a, b) for a, b in zip(ref16, ref32)]
        flops = attention_flops(case)
        times = {}
        for impl in attention_impls(case, bench, with_flex or only_flex):
            if only_flex != (impl.name == "flex_attention"):
                continue
            common = dict(section="attention", case=case.name, impl=impl.name)
            if impl.run is None:
                bench.record(**common, note=impl.note)
                continue
            for pass_ in ("fwd", "fwd+bwd"):
                try:
                    leaves = impl.inputs(q, k, v)
                    if pass_ == "fwd":
                        inputs = [x.detach() for x in leaves]
                        with torch.no_grad():
                            ms, out = measure(lambda: impl.run(*inputs), bench)
                        results = [impl.packed(out)]
                    else:
                        grad_out = impl.inputs(do, k, v)[0].detach()  # dO in the impl's layout

                        def step():
                            o = impl.run(*leaves)
                            return (o, *torch.autograd.grad(o, leaves, grad_out))
                        ms, res = measure(step, bench)
                        results = [impl.packed(x) for x in res]
                    errs = [max_err(a, b) for a, b in zip(results, ref32)]
                    ok = all(within_rule(e, b, r) for e, b, r in zip(errs, base, ref32))
                    work = flops * (1 if pass_ == "fwd" else 3.5)
                    times[impl.name, pass_] = ms
                    bench.record(**common, **{"pass": pass_}, ms=ms, tflops=work / ms / 1e9,
                                 frac_peak=(work / ms / 1e9 / bench.peak_tflops) if bench.peak_tflops else None,
                                 err=max(errs), ok=ok, note=impl.note)
                except Exception as exc:  # noqa: BLE001 - a failing peer is a row, not the end
                    bench.record(**common, **{"pass": pass_}, note=f"failed: {_describe(exc)}")
                    if impl.name == "triton":
                        traceback.print_exc()
                    if bench.device.type == "cuda":
                        torch.cuda.empty_cache()
        if not only_flex:
            _attention_summary(bench, case, times, flops)


def _attention_summary(bench, case, times, flops):
    """Speed-ups of the Triton kernel and the issue's targets, per pass (bwd = fwd+bwd - fwd)."""
    for pass_ in ("fwd", "fwd+bwd", "bwd"):
        def t(impl):
            if pass_ != "bwd":
                return times.get((impl, pass_))
            a, b = times.get((impl, "fwd+bwd")), times.get((impl, "fwd"))
            return None if a is None or b is None else a - b
        ours = t("triton")
        if ours is None:
            continue
        row = dict(section="attention", case=case.name, impl="summary", ms=ours,
                   tflops=flops * {"fwd": 1, "fwd+bwd": 3.5, "bwd": 2.5}[pass_] / ours / 1e9)
        row["pass"] = pass_
        if t("varlen_attn"):
            row["x_vs_varlen_attn"] = round(t("varlen_attn") / ours, 3)
        sdpa = {n: t(n) for n in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient") if t(n)}
        if sdpa:
            best = min(sdpa, key=sdpa.get)
            row["x_vs_best_sdpa"] = round(sdpa[best] / ours, 3)
            row["best_sdpa"] = best
        bench.record(**row)


# -----------------------------------------------------------------------------
# fused_ops

def bench_fused_ops(bench):
    dev, dtype = bench.device, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    T, D, H, HD, I, V = (8192, 4096, 32, 128, 11008, 151680) if not bench.dry else (64, 96, 2, 80, 160, 1500)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev)

    x, w = rnd(T, D), 1 + rnd(D, s=0.1)
    angles = rnd(T, HD // 2, s=3.0)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    gate, up = rnd(T, I), rnd(T, I)
    hidden, weight = rnd(T, D), rnd(V, D, s=0.02)
    labels = torch.randint(0, V, (T,), generator=g).to(dev)
    labels[::7] = -100
    ops = {
        # name: (public op (run with MIMOVL_KERNELS=triton), its torch reference, float inputs,
        #        bytes moved by one forward)
        "rms_norm": (lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: K.rms_norm_torch(x, w, 1e-6),
                     (x, w), 2 * T * D * 2),
        "apply_rotary": (lambda q: K.apply_rotary(q, cos, sin), lambda q: K.apply_rotary_torch(q, cos, sin),
                         (rnd(T, H, HD),), 2 * T * H * HD * 2),
        "swiglu": (K.swiglu, K.swiglu_torch, (gate, up), 3 * T * I * 2),
        "linear_cross_entropy": (lambda h, w: K.linear_cross_entropy(h, w, labels),
                                 lambda h, w: K.linear_cross_entropy_torch(h, w, labels), (hidden, weight), None),
    }
    for name, (fn_triton, fn_torch, inputs, nbytes) in ops.items():
        if bench.time_left() < (20 if not bench.dry else 0):
            bench.record(section="fused_ops", case=name, note="skipped: time budget")
            continue
        try:
            ref32 = _op_run(fn_torch, inputs, torch.float32, grad=True)
            ref16 = _op_run(fn_torch, inputs, dtype, grad=True)
        except Exception as exc:  # noqa: BLE001
            bench.record(section="fused_ops", case=name, note=f"reference failed: {_describe(exc)}")
            continue
        base = [max_err(a, b) for a, b in zip(ref16, ref32)]
        for impl, fn in (("triton", fn_triton), ("torch", fn_torch)):
            for pass_ in ("fwd", "fwd+bwd"):
                try:
                    with forced_kernels(impl):
                        ms, res, peak = _measure_op(fn, inputs, dtype, pass_, bench)
                    ref_n = ref32[:len(res)]
                    errs = [max_err(a, b) for a, b in zip(res, ref_n)]
                    ok = all(within_rule(e, b, r) for e, b, r in zip(errs, base, ref_n))
                    gbps = nbytes / ms / 1e6 if nbytes and pass_ == "fwd" else None
                    bench.record(section="fused_ops", case=name, impl=impl, **{"pass": pass_}, ms=ms,
                                 err=max(errs), ok=ok, gb_per_s=gbps,
                                 peak_extra_gib=None if peak is None else round(peak, 3))
                except Exception as exc:  # noqa: BLE001
                    bench.record(section="fused_ops", case=name, impl=impl, **{"pass": pass_},
                                 note=f"failed: {_describe(exc)}")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()


def _measure_op(fn, inputs, dtype, pass_, bench):
    """(ms, [output, grads...], peak extra GiB on the GPU or None) of one op."""
    dev = bench.device
    leaves = _leaves(*(t.to(dtype) for t in inputs))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if pass_ == "fwd":
        inputs_fwd = [x.detach() for x in leaves]
        with torch.no_grad():
            ms, out = measure(lambda: fn(*inputs_fwd), bench)
        res = [out]
    else:
        go = _fixed_grad(fn(*leaves))

        def step():
            o = fn(*leaves)
            return (o, *torch.autograd.grad(o, leaves, go))
        ms, res = measure(step, bench)
    peak = (torch.cuda.max_memory_allocated() - mem0) / 2 ** 30 if dev.type == "cuda" else None
    return ms, list(res), peak


def _fixed_grad(o):
    """A fixed random output gradient (1 for a scalar), made once outside the timed calls."""
    if o.dim() == 0:
        return torch.ones_like(o)
    g = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(o.shape, generator=g).to(o.device, o.dtype)


def _op_run(fn, inputs, dtype, grad):
    leaves = _leaves(*(t.to(dtype) for t in inputs))
    out = fn(*leaves)
    if not grad:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, _fixed_grad(out))]


# -----------------------------------------------------------------------------
# vit_tower

def bench_vit_tower(bench):
    try:
        from vit import VisionConfig, VisionTransformer
    except Exception as exc:  # noqa: BLE001
        bench.record(section="vit_tower", note=f"unavailable: {_describe(exc)}")
        return
    dev, dtype = bench.device, torch.bfloat16
    if bench.dry:
        cfg = VisionConfig(depth=2, hidden_size=160, intermediate_size=96, num_heads=2,
                           fullatt_block_indexes=[1], out_hidden_size=64)
        grid = torch.tensor([[1, 8, 8]])
    else:
        cfg, grid = VisionConfig(), torch.tensor([[1, 72, 72]])  # MiMo-VL-7B vision tower, 1 MP image
    n = int(grid.prod())
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(n, cfg.patch_dim, generator=g).to(dev, dtype)
    torch.manual_seed(0)
    ours = VisionTransformer(cfg).to(dev, dtype)
    with torch.no_grad():  # fresh init leaves norms at 1 and biases at 0: perturb everything
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    models = {"ours": ours}
    try:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        hf_cfg = Qwen2_5_VLVisionConfig(
            depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads, out_hidden_size=cfg.out_hidden_size, window_size=cfg.window_size,
            fullatt_block_indexes=list(cfg.fullatt_block_indexes), patch_size=cfg.patch_size,
            spatial_merge_size=cfg.spatial_merge_size, temporal_patch_size=cfg.temporal_patch_size,
            tokens_per_second=cfg.tokens_per_second, in_channels=cfg.in_channels)
        hf_cfg._attn_implementation = "sdpa"
        hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg).to(dev, dtype)
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weight names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        models["transformers"] = hf
    except Exception as exc:  # noqa: BLE001
        bench.record(section="vit_tower", impl="transformers", note=f"unavailable: {_describe(exc)}")

    def run(name, model):
        out = model(pixels, grid) if name == "ours" else model(pixels, grid_thw=grid)
        if not torch.is_tensor(out):  # transformers 5 returns a ModelOutput (merged = pooler_output)
            out = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
        return out

    outputs = {}
    for name, model in models.items():
        for pass_ in ("fwd", "fwd+bwd"):
            if bench.time_left() < (15 if not bench.dry else 0):
                bench.record(section="vit_tower", impl=name, note="skipped: time budget")
                continue
            try:
                with forced_kernels("triton"):  # ours on the Triton kernels (also in --dry, on the CPU)
                    if pass_ == "fwd":
                        with torch.no_grad():
                            ms, out = measure(lambda: run(name, model), bench)
                        outputs[name] = out
                    else:
                        with torch.no_grad():
                            go = _fixed_grad(run(name, model))

                        def step():
                            model.zero_grad(set_to_none=True)
                            o = run(name, model)
                            o.backward(go)
                            return o
                        ms, _ = measure(step, bench)
                err = max_err(outputs[name], outputs["ours"]) if name != "ours" and name in outputs else None
                bench.record(section="vit_tower", case=f"{cfg.depth} blocks, {n} patches", impl=name,
                             **{"pass": pass_}, ms=ms, err=err,
                             note="err: max |transformers - ours| (bf16)" if err is not None else None)
            except Exception as exc:  # noqa: BLE001
                bench.record(section="vit_tower", impl=name, **{"pass": pass_}, note=f"failed: {_describe(exc)}")


# -----------------------------------------------------------------------------
# memory: training.memory_estimate_gib against the CUDA allocator's peak

MEMORY_STAGES = ("1", "2", "3", "4")  # --dry: "1" (frozen towers) and "3" (all trainable)
MEMORY_IMAGE_SHARE = 0.5       # half of every row's tokens are merged image tokens (one image)
MEMORY_SECTION_S = 60          # no new case starts after this many seconds in the section


def one_rank_fsdp(device, backend):
    """A training.Compute for one process that still counts as distributed, so that
    training.wrap_model takes its FSDP2 path (fully_shard per block, then the root) in a
    one-process group: the real sharded step, with shards the size of the whole model."""
    import training

    class OneRank(training.Compute):
        distributed = property(lambda self: True)
    return OneRank(device, amp_dtype=torch.bfloat16, backend=backend)


def memory_config(dry):
    """MiMo-VL-7B's widths (vocabulary, hidden sizes, heads) with 2 LM layers and 2 ViT blocks
    (the second with full attention), so a whole step fits the bench's time; --dry: the tiny
    preset, cut the same way."""
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny" if dry else "mimo-vl-7b")
    cfg.text.num_hidden_layers, cfg.vision.depth, cfg.vision.fullatt_block_indexes = 2, 2, [1]
    return cfg.validate()


def memory_batch(cfg, seq_len, image_share, device):
    """One packed row of `seq_len` tokens as the loader makes it: one image of
    4 * image_share * seq_len patches (a grid as square as the count allows), then text; labels on
    the text only."""
    merged = int(image_share * seq_len)
    rows = max(d for d in range(1, math.isqrt(merged) + 1) if merged % d == 0)
    grid = torch.tensor([[1, 2 * rows, 2 * (merged // rows)]])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, cfg.text.vocab_size, (1, seq_len), generator=g)
    specials = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                             cfg.vision_end_token_id])
    ids[torch.isin(ids, specials)] = 20
    ids[0, 0], ids[0, merged + 1] = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids[0, 1:merged + 1] = cfg.image_token_id
    labels = ids.clone()
    labels[0, :merged + 2] = -100
    pixels = torch.randn(4 * merged, cfg.vision.patch_dim, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device),
            "image_grid_thw": grid.to(device), "cu_seqlens": torch.tensor([0, seq_len], dtype=torch.int32).to(device)}


def memory_step(cfg, compute, trainable, batch):
    """The pre-training step of train_pretrain under FSDP2 with gradient checkpointing: the model
    built on the meta device and sharded by training.wrap_model, AdamW from
    training.build_optimizer, one warm-up step (kernels compile, AdamW allocates its moments),
    then the measured step: forward with the chunked cross-entropy, backward, gradient clipping,
    optimizer.step. -> (peak bytes allocated during the measured step above what was allocated
    before the model was built, None on the CPU; its milliseconds; its loss)."""
    import training
    from torch.distributed.tensor import DTensor
    from mimovl import MiMoVL
    cuda = compute.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    with torch.device("meta"):
        model = MiMoVL(cfg)
    training.set_trainable(model, trainable)
    model.visual.gradient_checkpointing = model.model.gradient_checkpointing = True
    model.train()
    wrapped = training.wrap_model(model, compute, fsdp=True)
    if not training.is_sharded(wrapped):
        raise RuntimeError("training.wrap_model did not take its FSDP2 path")
    with torch.no_grad():  # wrap_model's to_empty left the shards uninitialised
        for p in wrapped.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).normal_(0, 0.02)
    opt = training.build_optimizer(wrapped, 1e-5, 0.1, (0.9, 0.95), compute.device)
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def step():
        with compute.autocast():
            loss = wrapped(**batch).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = float(step())
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    return (torch.cuda.max_memory_allocated() - baseline if cuda else None), ms, loss


def bench_memory_model(bench):
    """training.memory_estimate_gib(cfg, 1, seq_len, trainable, image_share) beside
    torch.cuda.max_memory_allocated over one real FSDP2 step (memory_step) for pre-training
    stages 1-4 at the paper's row lengths (train_pretrain.PAPER_STAGES: 8K, 32K for stage 4) on
    MiMo-VL-7B's widths with 2 LM layers and 2 ViT blocks (memory_config). `ok`: the measured
    peak within 20 % of the estimate. --dry: the tiny config, stages 1 and 3 at 1/64 of the row
    length, on the CPU (gloo): every step taken, nothing measured."""
    import torch.distributed as dist
    import training
    from train_pretrain import PAPER_STAGES
    if bench.dry and torch.cuda.is_available():
        bench.record(section="memory", impl="skipped", note="--dry on a machine with a GPU: FSDP2's "
                     "default device mesh would be the GPU's while the dry run's model is on the CPU")
        return
    cuda = bench.device.type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else bench.device
    own_group = not dist.is_initialized()
    if own_group:  # one process, an in-memory rendezvous: no port to pick
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                **({"device_id": device} if cuda else {}))
    section_end = time.time() + MEMORY_SECTION_S
    done = []
    try:
        if dist.get_world_size() != 1:
            raise RuntimeError(f"a process group of {dist.get_world_size()} processes is already running; "
                               "run bench.py as one plain process")
        cfg = memory_config(bench.dry)
        compute = one_rank_fsdp(device, dist.get_backend())
        for key in ("1", "3") if bench.dry else MEMORY_STAGES:
            stage = PAPER_STAGES[key]
            seq_len = stage.seq_len // 64 if bench.dry else stage.seq_len
            case = f"stage {key}, {seq_len} tok"
            if not bench.dry and (bench.time_left() < 20 or time.time() > section_end):
                bench.record(section="memory", case=case, note="skipped: time budget")
                continue
            try:
                batch = memory_batch(cfg, seq_len, MEMORY_IMAGE_SHARE, device)
                peak, ms, loss = memory_step(cfg, compute, stage.trainable, batch)
                est = training.memory_estimate_gib(cfg, 1, seq_len, stage.trainable, MEMORY_IMAGE_SHARE)
                row = dict(section="memory", case=case, impl="fsdp2_step", ms=ms,
                           estimate_gib=round(est["total"], 3), loss=round(loss, 4),
                           terms={k: round(v, 3) for k, v in est.items() if k != "total"},
                           note=f"trains {'+'.join(stage.trainable)}; {cfg.text.num_hidden_layers} LM layers, "
                                f"{cfg.vision.depth} ViT blocks; image grid {batch['image_grid_thw'][0].tolist()}")
                if peak is not None:
                    row.update(peak_gib=round(peak / 2 ** 30, 3), ratio=round(peak / 2 ** 30 / est["total"], 3))
                    row["ok"] = abs(row["ratio"] - 1) <= 0.2
                done.append(bench.record(**row))
            except Exception as exc:  # noqa: BLE001 - an OOM in one case is a row, not the end
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                bench.record(section="memory", case=case, impl="error", ok=False,
                             note=("out of memory: " if oom else "") + _describe(exc))
            finally:
                if cuda:
                    torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - e.g. NCCL missing
        bench.record(section="memory", impl="error", ok=False, note=_describe(exc))
    finally:
        if own_group:
            dist.destroy_process_group()
    if done:
        bench.record(section="memory", case="estimate vs measured", impl="summary", note="; ".join(
            f"{r['case']}: {r['peak_gib']:.2f} GiB measured / {r['estimate_gib']:.2f} estimated = {r['ratio']:.2f}"
            if "peak_gib" in r else f"{r['case']}: {r['estimate_gib']:.3f} GiB estimated, not measured (--dry)"
            for r in done))


# -----------------------------------------------------------------------------
# sweep (--sweep)

SWEEP_FWD = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
SWEEP_BWD = [((64, 64, 8, 2), (64, 64, 8, 2)), ((64, 128, 8, 2), (128, 64, 8, 2)),
             ((32, 128, 8, 2), (128, 32, 8, 2)), ((64, 64, 4, 2), (64, 64, 4, 2))]


def bench_sweep(bench):
    """Alternative block sizes (block_m, block_n, warps, stages) on the first LM case."""
    case = attention_cases(bench.dry)[0]
    dtype, dev = torch.bfloat16, bench.device
    g = torch.Generator(device="cpu").manual_seed(0)
    total = sum(case.lens)
    q = torch.randn(total, case.n_heads, case.head_dim, generator=g).to(dev, dtype)
    k, v = (torch.randn(total, case.n_kv_heads, case.head_dim, generator=g).to(dev, dtype) for _ in range(2))
    do = torch.randn_like(q)
    cu = torch.tensor([0] + torch.tensor(case.lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    L, scale, flops = max(case.lens), case.head_dim ** -0.5, attention_flops(case)
    configs = [("fwd", {"fwd": K.AttnBlocks(*c)}) for c in SWEEP_FWD] + \
              [("bwd", {"dkdv": K.AttnBlocks(*a), "dq": K.AttnBlocks(*b)}) for a, b in SWEEP_BWD]
    for pass_, blocks in configs:
        if bench.time_left() < (10 if not bench.dry else 0):
            bench.record(section="sweep", case=case.name, note="skipped: time budget")
            break
        try:
            leaves = _leaves(q, k, v)
            if pass_ == "fwd":
                with torch.no_grad():
                    ms, _ = measure(lambda: K.varlen_attention_triton(*leaves, cu, cu, L, L, case.causal,
                                                                      scale, blocks=blocks), bench)
                work = flops
            else:
                out = K.varlen_attention_triton(*leaves, cu, cu, L, L, case.causal, scale, blocks=blocks)
                ms, _ = measure(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), bench)
                work = 2.5 * flops
            bench.record(section="sweep", case=case.name, impl="triton", **{"pass": pass_}, ms=ms,
                         tflops=work / ms / 1e9, note=json.dumps({k: list(vars(b).values()) for k, b in blocks.items()}))
        except Exception as exc:  # noqa: BLE001
            bench.record(section="sweep", case=case.name, impl="triton", **{"pass": pass_},
                         note=f"failed {blocks}: {_describe(exc)}")


# -----------------------------------------------------------------------------
# compile (--compile-sm90)

def compile_variants():
    """(name, kernel, {pointer arg: type}, constexprs, num_warps, num_stages) for every kernel
    configuration the GPU group launches: the attention passes for the LM, ViT-full and
    ViT-window shapes (bf16, plus fp16 and fp32 inputs), and the fused ops."""
    cuda = torch.device("cuda")
    for dtype, hd, causal, group, max_len in [("bf16", 128, True, 4, 8192), ("bf16", 80, False, 1, 5184),
                                              ("bf16", 80, False, 1, 64), ("bf16", 64, True, 2, 2048),
                                              ("fp16", 128, True, 4, 8192), ("fp32", 128, True, 4, 8192)]:
        d0, d1 = K.split_head_dim(hd)
        consts = dict(GROUP=group, CAUSAL=causal, HEAD_DIM=hd, D0=d0, D1=d1, MASK0=d0 > hd, MASK1=d0 + d1 > hd,
                      UPCAST=False, DOT_PREC="ieee" if dtype == "fp32" else "tf32")
        ptrs = {n: "*" + dtype for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs.update({n: "*fp32" for n in ("LSE2", "DELTA")}, **{n: "*i32" for n in ("cu_q", "cu_k", "tile_seg", "tile_blk")})
        for pass_, kernel in (("fwd", K.attn_fwd_kernel), ("dkdv", K.attn_bwd_dkdv_kernel), ("dq", K.attn_bwd_dq_kernel)):
            b = K.attn_blocks(pass_, hd, max_len, max_len, cuda, getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]))
            yield (f"attn_{pass_} {dtype} d{hd} {'causal' if causal else 'bidir'} L{max_len}", kernel, ptrs,
                   dict(consts, BLOCK_M=b.block_m, BLOCK_N=b.block_n), b.num_warps, b.num_stages)
        if dtype == "bf16":
            yield (f"attn_delta bf16 d{hd}", K.attn_bwd_delta_kernel, ptrs,
                   dict(HEAD_DIM=hd, D_PAD=K.next_pow2(hd), BLOCK_T=64), 4, 3)
    for n_cols in (4096, 1280):
        block, rows, warps = K.row_block(n_cols, cuda)
        ptrs = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "RSTD": "*fp32", "DW_PART": "*fp32"}
        yield f"rms_norm_fwd bf16 D{n_cols}", K.rms_norm_fwd_kernel, ptrs, dict(ROWS=rows, BLOCK=block), warps, 3
        yield f"rms_norm_bwd bf16 D{n_cols}", K.rms_norm_bwd_kernel, ptrs, dict(ROWS=rows, BLOCK=block), warps, 3
    for hd in (128, 80):
        for backward in (False, True):
            half_pad = K.next_pow2(hd // 2)
            yield (f"rotary{'_bwd' if backward else ''} bf16 d{hd}", K.rotary_kernel,
                   {"X": "*bf16", "Y": "*bf16", "COS": "*fp32", "SIN": "*fp32"},
                   dict(HALF=hd // 2, HALF_PAD=half_pad, BLOCK_T=max(1, min(64, 2048 // half_pad)),
                        BACKWARD=backward), 4, 3)
    ptrs = {n: "*bf16" for n in ("G", "U", "Y", "DY", "DG", "DU")}
    yield "swiglu_fwd bf16", K.swiglu_fwd_kernel, ptrs, dict(BLOCK=1024), 4, 3
    yield "swiglu_bwd bf16", K.swiglu_bwd_kernel, ptrs, dict(BLOCK=1024), 4, 3
    yield ("cross_entropy_chunk bf16", K.ce_chunk_kernel, {"LOGITS": "*bf16", "LABELS": "*i64", "LOSS": "*fp32"},
           dict(BLOCK_V=4096, WRITE_GRAD=True), 8, 3)


def _scalar_type(name):
    if name.startswith(("stride", "total", "n_")) or name in ("rows_per_program", "ignore_index", "n"):
        return "i32"
    if name in ("qk_scale2", "scale", "eps"):
        return "fp32"
    raise KeyError(f"no compile-check type for kernel argument {name!r}")


def bench_compile_sm90(bench):
    """Compile the variants of compile_variants() (with --dry: one per kernel and head-dim layout)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen = set()
    for name, kernel, ptrs, consts, num_warps, num_stages in compile_variants():
        key = (kernel, consts.get("D1"))
        if bench.dry and key in seen:
            continue
        seen.add(key)
        try:
            signature = {a: "constexpr" if a in consts else ptrs.get(a) or _scalar_type(a) for a in kernel.arg_names}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
            usage = {}
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                          text=True).stdout
                for key, field_ in (("regs", "REG"), ("spill_bytes", "STACK")):
                    m = re.search(field_ + r":(\d+)", text)
                    usage[key] = int(m.group(1)) if m else None
            bench.record(section="compile", case=name, impl="triton", ok=True, smem=compiled.metadata.shared,
                         warps=num_warps, stages=num_stages, **usage)
        except Exception as exc:  # noqa: BLE001
            bench.record(section="compile", case=name, impl="triton", ok=False, note=f"failed: {_describe(exc)}")


# -----------------------------------------------------------------------------
# main

# The acceptance targets on an H200 (LM: the two lm_* cases; ViT: the window case)
TARGETS = [("lm_", "fwd", "x_vs_varlen_attn", 1.15), ("lm_", "fwd", "tflops", 400.0),
           ("lm_", "bwd", "x_vs_varlen_attn", 1.0), ("vit_", "fwd", "x_vs_best_sdpa", 1.0),
           ("vit_", "fwd+bwd", "x_vs_best_sdpa", 1.0)]


# -----------------------------------------------------------------------------
# CPU group (--cpu): our engine against transformers 4.57 on the same weights and inputs.
# Runs are interleaved (ours, theirs, ours, theirs, ...) and the speed-up is the median of the
# per-pair ratios, so a neighbour process slowing the machine for a while hits both sides.

def cpu_ceilings(bench):
    """What this CPU can do at all: bf16 / fp32 matmul GFLOP/s and memory copy GB/s."""
    n = 512 if bench.dry else 2048
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            a @ b
        out[name] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9
    x = torch.ones((16 if bench.dry else 256) * 2 ** 20, dtype=torch.uint8)
    y = torch.empty_like(x)
    y.copy_(x)
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        y.copy_(x)
    out["copy_gbs"] = 2 * x.numel() * reps / (time.perf_counter() - t0) / 1e9   # read + write
    bench.cpu_ceilings = out
    bench.record(section="cpu", case="ceilings", impl="torch", note=json.dumps(
        {"matmul_bf16_gflops": round(out["bf16"], 1), "matmul_fp32_gflops": round(out["fp32"], 1),
         "copy_gbs": round(out["copy_gbs"], 1), "threads": torch.get_num_threads()}))


def paired_models(cfg, dtype=torch.bfloat16, seed=0):
    """Our model with random weights, and transformers' Qwen2_5_VLForConditionalGeneration built on
    the meta device and given clones of the very same tensors (fast: no random init of 2 B
    parameters; the clones keep packing ours from touching theirs)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hfm

    from mimovl import MiMoVL
    torch.manual_seed(seed)
    with torch.device("meta"):
        ours = MiMoVL(cfg)
    ours = ours.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.fill_(1.0) if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight",
                                           "ln_q.weight")) else p.normal_(0, 0.02)
    d = cfg.to_hf_dict()
    hcfg = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k != "architectures"})
    for c in (hcfg, hcfg.text_config, hcfg.vision_config):
        c._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(hcfg)
    state = {}
    for k, v in ours.state_dict().items():
        k = "model." + k if k.startswith("visual.") else k
        k = "model.language_model." + k[len("model."):] if k.startswith("model.") and not k.startswith("model.visual.") else k
        state[k] = v.clone()
    hf.load_state_dict(state, assign=True, strict=True)
    # non-persistent rotary buffers were created on the meta device: rebuild them
    hf.model.language_model.rotary_emb = hfm.Qwen2_5_VLRotaryEmbedding(config=hcfg.text_config)
    vc = hcfg.vision_config
    hf.model.visual.rotary_pos_emb = hfm.Qwen2_5_VisionRotaryEmbedding(vc.hidden_size // vc.num_heads // 2)
    hf.generation_config.pad_token_id = 0
    return ours.eval(), hf.eval()


def _paired_runs(ours_fn, hf_fn, repeats):
    ours_fn(), hf_fn()                                   # warm-up
    return [(ours_fn(), hf_fn()) for _ in range(repeats)]


def _cpu_dtype():
    from chat import default_dtype
    return default_dtype("cpu")


def _frac(value, ceiling):
    return round(value / ceiling, 3) if ceiling else None


def bench_cpu_generate(bench):
    """Prefill time and decode tokens/s: real-width MiMo-7B layers (4 of 36, 4096 wide, vocab
    151,680) in bf16 where the CPU has it, our engine (weights packed for oneDNN) vs
    transformers' generate."""
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny" if bench.dry else "mimo-vl-7b")
    if not bench.dry:
        cfg.text.num_hidden_layers = 4
        cfg.vision.depth, cfg.vision.fullatt_block_indexes = 1, [0]
    dtype = _cpu_dtype()
    ours, hf = paired_models(cfg, dtype)
    packed = ours.prepare_for_cpu_inference()
    prompt, new = (32, 8) if bench.dry else (512, 32)
    ids = torch.randint(20, cfg.text.vocab_size, (1, prompt))
    mask = torch.ones_like(ids)

    def ours_run():
        t0 = time.perf_counter()
        steps = ours.stream_generate(ids, max_new_tokens=new, stop_token_ids=[])
        next(steps)
        t1 = time.perf_counter()
        for _ in steps:
            pass
        return t1 - t0, (new - 1) / (time.perf_counter() - t1)

    def hf_run():  # prefill = a one-token generate; decode = the rest of a full generate
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, eos_token_id=None)
        t1 = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
        t2 = time.perf_counter()
        return t1 - t0, (new - 1) / max((t2 - t1) - (t1 - t0), 1e-9)

    with torch.inference_mode():
        pairs = _paired_runs(ours_run, hf_run, 1 if bench.dry else 3)
    c = getattr(bench, "cpu_ceilings", {})
    layer_params = sum(p.numel() for n, p in hf.named_parameters() if ".layers." in n)
    head_params = hf.lm_head.weight.numel()
    pre_flops = 2 * prompt * layer_params + 2 * head_params      # the head runs on the last token only
    decode_bytes = (layer_params + head_params) * (2 if dtype == torch.bfloat16 else 4)
    for name, idx, better in (("prefill", 0, "lower"), ("decode", 1, "higher")):
        o = statistics.median(p[0][idx] for p in pairs)
        h = statistics.median(p[1][idx] for p in pairs)
        ratio = statistics.median((p[1][idx] / p[0][idx]) if idx == 0 else (p[0][idx] / p[1][idx]) for p in pairs)
        extra = {"speedup": round(ratio, 3), "ours": round(o * 1e3 if idx == 0 else o, 3),
                 "transformers": round(h * 1e3 if idx == 0 else h, 3),
                 "unit": "ms" if idx == 0 else "tokens/s", "layers": cfg.text.num_hidden_layers,
                 "dtype": str(dtype), "packed_linears": packed}
        if idx == 0:
            extra["frac_matmul_ceiling"] = _frac(pre_flops / o / 1e9, c.get("bf16" if dtype == torch.bfloat16 else "fp32"))
        else:
            # weights streamed per second against the bytes/s a plain copy moves (read + write)
            extra["frac_memory_ceiling"] = _frac(decode_bytes * o / 1e9, c.get("copy_gbs"))
        bench.record(section="cpu", case=f"lm_{name}_{prompt}tok", impl="ours_vs_transformers", **extra)


def bench_cpu_vit(bench):
    """The full MiMo-VL ViT (32 blocks, 1280 wide) on one 448x448 image: ours vs transformers'
    vision tower, forward, same weights."""
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny" if bench.dry else "mimo-vl-7b")
    cfg.text.num_hidden_layers = 1
    dtype = _cpu_dtype()
    ours, hf = paired_models(cfg, dtype)
    packed = ours.prepare_for_cpu_inference()
    side = 224 if bench.dry else 448
    grid = torch.tensor([[1, side // 14, side // 14]])
    pv = torch.randn(int(grid.prod()), 1176, dtype=dtype)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with torch.inference_mode():
        pairs = _paired_runs(lambda: timed(lambda: ours.visual(pv, grid)),
                             lambda: timed(lambda: hf.model.visual(pv, grid_thw=grid)), 1 if bench.dry else 3)
        err = (ours.visual(pv, grid).float() - hf.model.visual(pv, grid_thw=grid).float()).abs().max().item()
    o, h = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    params = sum(p.numel() for p in hf.model.visual.parameters())
    flops = 2 * pv.shape[0] * params
    bench.record(section="cpu", case=f"vit_{side}px", impl="ours_vs_transformers", ms=o * 1e3, err=err,
                 speedup=round(statistics.median(p[1] / p[0] for p in pairs), 3), transformers_ms=round(h * 1e3, 1),
                 frac_matmul_ceiling=_frac(flops / o / 1e9, getattr(bench, "cpu_ceilings", {}).get(
                     "bf16" if dtype == torch.bfloat16 else "fp32")), dtype=str(dtype), packed_linears=packed)


def bench_cpu_load_rss(bench):
    """Peak resident memory of a fresh process while MiMoVL.from_pretrained loads a ~1 GB bf16
    checkpoint in 4 shards, every weight touched afterwards: at most the model plus one shard
    (then the official 16.6 GB model loads on a 24 GB machine)."""
    import subprocess
    import tempfile
    import textwrap

    import mimovl
    from mimovl import MiMoVL, MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny")
    t = cfg.text
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 1024, 2816, 8, 2
    t.vocab_size, t.mrope_section = 32000, [16, 24, 24]
    cfg.vision.out_hidden_size = 1024
    per_layer = 2 * 1024 * 1024 + 2 * 256 * 1024 + 3 * 1024 * 2816
    target = 0.05e9 if bench.dry else 1.0e9
    t.num_hidden_layers = max(1, round((target / 2 - 2 * 32000 * 1024) / per_layer))
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = MiMoVL(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp, max_shard_bytes=int(size / 4 * 1.05))
        del model
        shards = [os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors")]
        code = textwrap.dedent(f"""
            import torch
            from mimovl import MiMoVL
            def hwm():  # this process's peak resident set (ru_maxrss would include the parent's)
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            base = hwm()
            m = MiMoVL.from_pretrained({tmp!r}, dtype=torch.bfloat16, progress=False)
            for p in m.parameters():   # touch every weight: lazily mapped pages become resident
                p.sum()
            print(base, hwm())
        """)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mimovl.__file__)))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        base, peak = map(int, out.stdout.split())
    budget = size + max(shards)
    bench.record(section="cpu", case="load_rss_4_shards", impl="ours", ok=peak - base <= budget,
                 note=f"peak {(peak - base) / 1e6:.0f} MB over the {base / 1e6:.0f} MB interpreter; "
                      f"model {size / 1e6:.0f} MB, largest of {len(shards)} shards {max(shards) / 1e6:.0f} MB, "
                      f"budget model + shard {budget / 1e6:.0f} MB")


def bench_cpu_loader(bench):
    """Samples/s the packed loader makes vs samples/s a tiny-preset training step consumes."""
    import packing
    import synthetic
    from mimovl import MiMoVL, MiMoVLConfig
    from processor import Processor
    with __import__("tempfile").TemporaryDirectory() as tmp:
        synthetic.train_tokenizer(tmp, n_samples=500)
        processor = Processor.from_pretrained(tmp)
    max_tokens = 512 if bench.dry else 2048
    loader = packing.PackedLoader(synthetic.SyntheticDataset(3), processor, max_tokens=max_tokens, chunk_size=64)
    made = packing.loader_throughput(loader, n_rows=3 if bench.dry else 30)
    torch.manual_seed(0)
    model = MiMoVL(MiMoVLConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = iter(loader)
    dtype = _cpu_dtype()
    n_samples, t0, steps = 0, time.perf_counter(), 2 if bench.dry else 5
    for _ in range(steps):
        row = next(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(row["input_ids"], labels=row["labels"], cu_seqlens=row["cu_seqlens"],
                         **{k: row[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                "video_grid_thw", "second_per_grid_ts") if row.get(k) is not None}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        n_samples += len(row["cu_seqlens"]) - 1
    consumed = n_samples / (time.perf_counter() - t0)
    bench.record(section="cpu", case=f"loader_{max_tokens}tok", impl="packing.PackedLoader",
                 ok=made["samples_per_s"] > consumed,
                 note=f"loader {made['samples_per_s']:.0f} samples/s vs training step {consumed:.1f} samples/s "
                      f"(tiny preset, {dtype})")


def bench_cpu_train_step(bench):
    """Training tokens/s of our forward+backward+AdamW step vs the same step on transformers'
    Qwen2_5_VLForConditionalGeneration: tiny preset, the same batch (4 rows of 256 tokens with a
    224-px image each), the same dtype policy (bf16 autocast where the CPU has bf16)."""
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny")
    ours, hf = paired_models(cfg, torch.float32)
    ours.train(), hf.train()
    B, L, side = (2, 96, 112) if bench.dry else (4, 256, 224)
    n_img = (side // 28) ** 2
    ids = torch.randint(20, cfg.text.vocab_size, (B, L))
    ids[:, 4] = cfg.vision_start_token_id
    ids[:, 5:5 + n_img] = cfg.image_token_id
    ids[:, 5 + n_img] = cfg.vision_end_token_id
    labels = ids.clone()
    labels[:, :6 + n_img] = -100
    grid = torch.tensor([[1, side // 14, side // 14]] * B)
    pv = torch.randn(int(grid.prod(-1).sum()), 1176)
    autocast = _cpu_dtype() == torch.bfloat16
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, hf)]

    def step(model, opt, hf_call):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=labels, pixel_values=pv, image_grid_thw=grid) if hf_call else \
                model(ids, labels=labels, pixel_values=pv, image_grid_thw=grid)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return B * L / (time.perf_counter() - t0)

    pairs = _paired_runs(lambda: step(ours, opts[0], False), lambda: step(hf, opts[1], True), 2 if bench.dry else 5)
    bench.record(section="cpu", case=f"train_step_{B}x{L}", impl="ours_vs_transformers",
                 speedup=round(statistics.median(o / h for o, h in pairs), 3),
                 ours_tokens_per_s=round(statistics.median(o for o, _ in pairs), 1),
                 transformers_tokens_per_s=round(statistics.median(h for _, h in pairs), 1),
                 note="tiny preset, bf16 autocast" if autocast else "tiny preset, fp32")


def run_cpu(bench, args):
    torch.set_num_threads(args.threads)
    for fn in (cpu_ceilings, bench_cpu_generate, bench_cpu_vit, bench_cpu_train_step, bench_cpu_loader,
               bench_cpu_load_rss):
        if bench.time_left() <= 0:
            bench.record(section="cpu", case=fn.__name__, impl="skipped", note="--budget-s exhausted")
            continue
        try:
            fn(bench)
        except Exception as exc:  # one broken section must not hide the others
            bench.record(section="cpu", case=fn.__name__, impl="error", ok=False, note=_describe(exc))


def report_targets(bench):
    """One row per target and case: the measured value against the target."""
    for prefix, pass_, metric, target in TARGETS:
        for row in bench.rows:
            if (row.get("impl") == "summary" and row["case"].startswith(prefix) and row["pass"] == pass_
                    and (prefix == "lm_" or "windows" in row["case"]) and metric in row):
                bench.record(section="targets", case=row["case"], impl=f"{metric} >= {target}",
                             **{"pass": pass_}, ok=row[metric] >= target, note=f"measured {row[metric]:.3f}")


def run_gpu(bench, args):
    bench_gemm_peak(bench)
    bench_attention(bench)
    bench_fused_ops(bench)
    bench_vit_tower(bench)
    bench_memory_model(bench)
    if not args.no_flex:
        bench_attention(bench, only_flex=True)
    if args.sweep:
        bench_sweep(bench)
    report_targets(bench)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- benchmark groups ---
    parser.add_argument("--gpu", action="store_true", help="kernels on one CUDA GPU (see the module docstring)")
    parser.add_argument("--cpu", action="store_true",
                        help="our engine vs transformers on this CPU: generation, ViT, training step, loader, load memory")
    parser.add_argument("--compile-sm90", action="store_true",
                        help="compile every kernel for Hopper (no GPU needed) and report registers/spills")
    # --- options ---
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter: checks that the script runs")
    parser.add_argument("--out", default="runs/bench.jsonl", help="JSON-lines file the rows are appended to")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="stop starting new measurements after this many seconds (default 270)")
    parser.add_argument("--sweep", action="store_true", help="also time alternative attention block sizes")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --cpu (default 2)")
    args = parser.parse_args()
    if not (args.gpu or args.compile_sm90 or args.cpu):
        parser.error("choose a benchmark group: --cpu, --gpu or --compile-sm90")
    if args.cpu and args.gpu:
        parser.error("run --cpu and --gpu separately")
    if args.compile_sm90 and args.gpu and args.dry:
        parser.error("--compile-sm90 needs the Triton compiler, --gpu --dry its interpreter: run them separately")

    if args.dry or not args.gpu:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():  # --gpu
        parser.error("--gpu needs a CUDA GPU (or --dry for the CPU smoke run)")
    else:
        device = torch.device("cuda")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bench = Bench(device=device, dry=args.dry, out_path=args.out, deadline=time.time() + args.budget_s)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    bench.record(section="env", impl="torch " + torch.__version__, note=json.dumps({
        "triton": triton_version, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dry": args.dry, "interpreter": K.INTERPRET, "argv": sys.argv[1:]}))
    if args.compile_sm90:
        bench_compile_sm90(bench)
    if args.gpu:
        run_gpu(bench, args)
    if args.cpu:
        run_cpu(bench, args)
    bad = [r for r in bench.rows if r.get("ok") is False and r.get("impl") in ("triton", "error")]
    print(f"\n{len(bench.rows)} rows -> {args.out}" + (f"; {len(bad)} Triton rows failed the accuracy rule"
                                                       if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
