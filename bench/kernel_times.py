"""Micro-benchmarks of the training kernels that selftune chose between, on one GPU.

    python bench/kernel_times.py [PART ...]   (parts: attention dropout blas_accumulate swiglu_lora lora_fold)

Attention for three 2048-token rows of the 7B model (28 query and 4 key/value heads of 128),
forward and forward + backward: the varlen flash kernel (key/value heads repeated, as torch 2.11's
`varlen_attn` has no grouped heads) against SDPA's flash and cuDNN kernels, grouped or repeated.
LoRA input dropout for 6,144 tokens: PyTorch's dropout (and, for backward, the rank-r GEMM plus
dropout's backward) against the Triton kernels of selftune.accel.kernels.dropout at several Philox
rounds and forward tiles. One LoRA projection's forward with B's product written first (as
grouped LoRA runs it) against B folded into the base GEMM along K; gate and up's forward and
SwiGLU with B's products written, against kernels.swiglu adding them inside the activation.
Times in ms (attention) and us (dropout, LoRA, SwiGLU), as JSON.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selftune.accel.kernels import dropout as fused_dropout  # noqa: E402


def timed(fn, calls: int = 20) -> float:
    """Seconds per call, after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def attention(rows: int = 3, length: int = 2048, heads: int = 28, kv: int = 4, dim: int = 128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    def make(n):
        return torch.randn(rows * length, n, dim, device="cuda", dtype=torch.bfloat16)

    q, k, v = (make(n).requires_grad_() for n in (heads, kv, kv))
    grad = torch.randn_like(q)
    cu = torch.arange(0, rows * length + 1, length, device="cuda", dtype=torch.int32)

    def repeat(t):
        return t.repeat_interleave(heads // kv, dim=1)

    def varlen():
        return varlen_attn(q, repeat(k), repeat(v), cu, cu, length, length, window_size=(-1, 0))

    def as_batch(t):
        return t.view(rows, length, t.shape[1], dim).transpose(1, 2)

    results = {}

    def record(name, forward, reference=None):
        def backward():
            forward().backward(grad)

        with torch.no_grad():
            out = forward()
            results[name] = {"forward_ms": round(timed(forward) * 1e3, 3)}
        results[name]["forward_backward_ms"] = round(timed(backward) * 1e3, 3)
        if reference is not None:
            results[name]["max_diff"] = (out.float() - reference.float()).abs().max().item()
        return out

    reference = record("varlen_flash_repeated", varlen)
    for backend_name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        for grouped in (True, False):

            def sdpa(backend=backend, grouped=grouped):
                kk, vv = (k, v) if grouped else (repeat(k), repeat(v))
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(
                        as_batch(q), as_batch(kk), as_batch(vv), is_causal=True, enable_gqa=grouped
                    )
                return out.transpose(1, 2).reshape(rows * length, heads, dim)

            name = f"sdpa_{backend_name}_{'grouped' if grouped else 'repeated'}"
            try:
                record(name, sdpa, reference)
            except RuntimeError as error:
                results[name] = {"error": str(error).splitlines()[0]}
    return results


SETTINGS = [(10, 16, 8), (7, 16, 8), (7, 32, 4)]  # Philox rounds, the forward's rows and warps


def dropout_row(tokens: int, width: int, rank: int, p: float) -> dict:
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    low = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(rank, width, device="cuda", dtype=torch.bfloat16)
    _, mask = torch.native_dropout(x, p, True)
    row = {
        "torch_forward_us": timed(lambda: torch.native_dropout(x, p, True), 30),
        "torch_mm_backward_us": timed(
            lambda: torch.ops.aten.native_dropout_backward(low @ a, mask, 1 / (1 - p)), 30
        ),
        "copy_us": timed(x.clone, 30),
    }
    seed = fused_dropout.draw_seed(x.device)
    landed = (fused_dropout.ROUNDS, fused_dropout.FORWARD_ROWS, fused_dropout.FORWARD_WARPS)
    for setting in SETTINGS:
        fused_dropout.ROUNDS, fused_dropout.FORWARD_ROWS, fused_dropout.FORWARD_WARPS = setting
        rounds, rows, warps = setting
        tag = f"triton_{rounds}_rounds_{rows}_rows_{warps}_warps"
        row[tag + "_forward_us"] = timed(lambda: fused_dropout.dropped(x, p, seed), 30)
        row[tag + "_backward_us"] = timed(lambda: fused_dropout.input_grad(low, a, p, seed), 30)
    fused_dropout.ROUNDS, fused_dropout.FORWARD_ROWS, fused_dropout.FORWARD_WARPS = landed
    return {k: round(v * 1e6, 1) for k, v in row.items()}


def dropout(tokens: int = 6144, p: float = 0.05) -> dict:
    return {
        f"{tokens}x{width}_rank{rank}": dropout_row(tokens, width, rank, p)
        for width, rank in ((18944, 8), (3584, 24))
    }


def lora_fold(
    tokens: int = 6144, width: int = 3584, out: int = 18944, rank: int = 8, device: str = "cuda"
) -> dict:
    """One LoRA projection's forward as grouped LoRA runs it (B's product written, then the base
    GEMM accumulating into it) against B folded into the base GEMM along K: [x | low] times
    [W | s B], which needs W kept inside a wider buffer, and against the other order (the base
    GEMM, then B's product added in); and B's product alone (the accumulating GEMM alone:
    blas_accumulate). Times in us; the base GEMM alone is the floor. For gate_proj / up_proj (3,584 -> 18,944) by default."""
    dtype = torch.bfloat16
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    low = torch.randn(tokens, rank, device=device, dtype=dtype)
    weight_ext = torch.randn(out, width + rank, device=device, dtype=dtype) / width**0.5
    weight, b = weight_ext[:, :width], weight_ext[:, width:]  # views, as the modules would hold

    def grouped():
        result = low @ b.t()
        return result.addmm_(x, weight.t())

    def folded():
        return torch.cat([x, low], dim=1) @ weight_ext.t()

    def base_then_add():  # the other order: the base GEMM alone, then B's product added in
        return (x @ weight.t()).addmm_(low, b.t())

    diff = (grouped().float() - folded().float()).abs().max().item()
    row = {
        "base_gemm_us": timed(lambda: x @ weight.t(), 30),
        "grouped_us": timed(grouped, 30),
        "folded_us": timed(folded, 30),
        "b_product_us": timed(lambda: low @ b.t(), 30),
        "base_then_add_us": timed(base_then_add, 30),
    }
    return {**{k: round(v * 1e6, 1) for k, v in row.items()}, "max_diff": diff}


def blas_accumulate(tokens: int = 6144, width: int = 3584) -> dict:
    """The base GEMM writing its output (beta = 0) against accumulating into it (beta = 1, as
    grouped LoRA and its backward run it), through cuBLAS and through cuBLASLt, for an
    18,944-wide output (gate_proj / up_proj forward, down_proj's input gradient) and a 3,584-wide
    one (q_proj). Times in us."""
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    found = {}
    before = torch.backends.cuda.preferred_blas_library()
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for out in (18944, 3584):
            w = torch.randn(out, width, device="cuda", dtype=torch.bfloat16) / width**0.5
            acc = torch.zeros(tokens, out, device="cuda", dtype=torch.bfloat16)
            write = functools.partial(torch.matmul, x, w.t())
            accumulate = functools.partial(acc.addmm_, x, w.t())
            found[f"{library}_{out}_write_us"] = round(timed(write, 30) * 1e6, 1)
            found[f"{library}_{out}_accumulate_us"] = round(timed(accumulate, 30) * 1e6, 1)
    torch.backends.cuda.preferred_blas_library(before)
    return found


def swiglu_lora(tokens: int = 6144, hidden: int = 3584, width: int = 18944, rank: int = 8) -> dict:
    """Gate and up with LoRA, SwiGLU, and down_proj's input gradient, as grouped LoRA runs them
    (B's products written and each base GEMM accumulating into its own; down_proj's adapter
    gradient written, by the dropout kernel or without dropout, and its base GEMM accumulating
    into it; Liger's SwiGLU) against kernels.swiglu: the base GEMMs writing, the rank-r
    products added inside the activation, and without dropout down_proj's adapter gradient
    handed to its backward. At several tiles, in us."""
    from selftune.accel.kernels import swiglu

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    def us(fn) -> float:
        return round(timed(fn, 30) * 1e6, 1)

    x, grad_down = randn(tokens, hidden), randn(tokens, hidden)
    w_gate, w_up = (randn(width, hidden, scale=hidden**-0.5) for _ in range(2))
    w_down = randn(hidden, width, scale=width**-0.5)
    a_all, a_down = randn(2 * rank, hidden, scale=hidden**-0.5), randn(rank, width, scale=0.1)
    b_scaled = (randn(width, rank, scale=0.1), randn(width, rank, scale=0.1))
    low, low_grad = x @ a_all.t(), randn(tokens, rank)
    seed = fused_dropout.draw_seed(torch.device("cuda"))
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return {"error": "liger-kernel is not installed"}

    def landed_forward():
        gate, up = low[:, :rank] @ b_scaled[0].t(), low[:, rank:] @ b_scaled[1].t()
        gate.addmm_(x, w_gate.t())
        up.addmm_(x, w_up.t())
        return swiglu_forward(gate, up)[2]

    gate, up = x @ w_gate.t(), x @ w_up.t()
    g, u = gate.clone(), up.clone()  # overwritten by the gradients

    def landed_backward(p: float):
        if p:
            grad = fused_dropout.input_grad(low_grad, a_down, p, seed)
        else:
            grad = low_grad @ a_down
        grad.addmm_(grad_down, w_down)
        swiglu_backward(g, u, grad)

    def fused_forward(tile=None):
        plain = x @ w_gate.t(), x @ w_up.t()
        return swiglu.kernel_forward(*plain, low, b_scaled, tile)

    def fused_backward(p: float, tile=None):
        if p:  # no handoff under dropout: as landed, then the kernel
            grad = fused_dropout.input_grad(low_grad, a_down, p, seed)
            grad.addmm_(grad_down, w_down)
            swiglu.kernel_backward_(grad, g, u, low, b_scaled, None, tile)
        else:
            grad = grad_down @ w_down
            swiglu.kernel_backward_(grad, g, u, low, b_scaled, (low_grad, a_down), tile)

    found = {
        "landed_forward_us": us(landed_forward),
        "base_gemms_alone_us": us(lambda: (x @ w_gate.t(), x @ w_up.t())),
        "liger_forward_us": us(lambda: swiglu_forward(gate, up)),
        "landed_backward_dropout_us": us(functools.partial(landed_backward, 0.05)),
        "landed_backward_no_dropout_us": us(functools.partial(landed_backward, 0.0)),
        "base_gemm_down_dx_us": us(lambda: grad_down @ w_down),
        "liger_backward_us": us(lambda: swiglu_backward(g, u, grad_down @ w_down)),
    }
    expected = F.silu(gate.float() + low[:, :rank].float() @ b_scaled[0].float().t())
    expected = expected * (up.float() + low[:, rank:].float() @ b_scaled[1].float().t())
    grad = grad_down @ w_down
    for tile in ((32, 128, 4), (16, 128, 4), (32, 64, 4), (64, 64, 4)):
        key = "x".join(map(str, tile))
        found[f"fused_forward_{key}_us"] = us(functools.partial(fused_forward, tile))
        activation = functools.partial(swiglu.kernel_forward, gate, up, low, b_scaled, tile)
        found[f"kernel_forward_{key}_us"] = us(activation)
        found[f"kernel_forward_{key}_max_diff"] = (
            (activation().float() - expected).abs().max().item()
        )
        for p in (0.05, 0.0):
            found[f"fused_backward_p{p}_{key}_us"] = us(functools.partial(fused_backward, p, tile))
        for kind, deferred in (("alone", None), ("handed", (low_grad, a_down))):
            run = functools.partial(swiglu.kernel_backward_, grad, g, u, low, b_scaled, deferred)
            found[f"kernel_backward_{kind}_{key}_us"] = us(functools.partial(run, tile))
    return found


PARTS = {
    "attention": attention,
    "dropout": dropout,
    "blas_accumulate": blas_accumulate,
    "swiglu_lora": swiglu_lora,
    "lora_fold": lambda: {"gate_up": lora_fold(), "q": lora_fold(out=3584, rank=24)},
}


def main() -> None:
    """Every part, or those named on the command line."""
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_times.py: needs a CUDA GPU")
    names = sys.argv[1:] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        sys.exit(f"bench/kernel_times.py: unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}")
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    record.update((name, PARTS[name]()) for name in names)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
