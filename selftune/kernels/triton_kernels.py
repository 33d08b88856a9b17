"""The Triton kernels (imported only where Triton is installed; the wrappers that call them,
and say why, are kernels.ce_rows and kernels.dropout). At module level, as Triton resolves the
helpers a kernel calls among the module's globals."""

import triton
import triton.language as tl

# -- cross-entropy of a chunk of logits (kernels.ce_rows) --


@triton.jit
def ce_rows_kernel(
    logits,
    stride,
    targets,
    losses,
    correct,
    vocab: tl.constexpr,  # a constant of the model (and Triton 3.6's interpreter needs it)
    write_grad: tl.constexpr,
    block: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    target = tl.load(targets + row)
    valid = target != -100
    # pass 1: running max and sum of exponents; the first index of the largest logit
    running_max = float("-inf")
    total = 0.0
    best = float("-inf")
    best_index = 0
    for start in range(0, vocab, block):
        cols = start + tl.arange(0, block)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        new_max = tl.maximum(running_max, block_max)
        total = total * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
        block_best = tl.argmax(x, 0, tie_break_left=True) + start
        better = block_max > best  # strictly: an earlier block keeps a tie
        best_index = tl.where(better, block_best, best_index)
        best = tl.maximum(best, block_max)
    lse = running_max + tl.log(total)
    safe = tl.where(valid, target, 0)
    picked = tl.load(base + safe, mask=safe < vocab, other=float("nan")).to(tl.float32)
    tl.store(losses + row, tl.where(valid, lse - picked, 0.0))
    tl.store(correct + row, (best_index == target).to(tl.int32))
    if write_grad:  # pass 2: softmax minus the one-hot target, over the logits
        for start in range(0, vocab, block):
            cols = start + tl.arange(0, block)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + cols, grad.to(logits.dtype.element_ty), mask=inside)


# -- LoRA input dropout (kernels.dropout) --


@triton.jit
def keep(seed, rows, tile, tiles, p, part: tl.constexpr, rounds: tl.constexpr):
    """The keep decisions of the tile's four parts, each (rows, part)."""
    counters = (rows[:, None] * tiles + tile) * part + tl.arange(0, part)[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, counters, rounds)
    return r0 >= p, r1 >= p, r2 >= p, r3 >= p


@triton.jit
def drop_part(x, out, rows, cols, n_rows, n_cols, keep_part, scale):
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    at = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    v = tl.load(x + at, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + at, tl.where(keep_part, v * scale, 0.0).to(out.dtype.element_ty), mask=inside)


# the rows and tiles vary from pack to pack: not specialised on, so that one compiled kernel serves
# them all; the width is a model's constant, and its divisibility by 16 (Triton's specialisation)
# is what lets the loads and stores be vectorised: without it the forward ran 7x slower
@triton.jit(do_not_specialize=["n_rows", "tiles"])
def dropout_forward(x, out, seed_ptr, n_rows, n_cols, tiles, p, scale,
            rows_per: tl.constexpr, part: tl.constexpr, rounds: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * rows_per + tl.arange(0, rows_per)
    tile = tl.program_id(1)
    k0, k1, k2, k3 = keep(tl.load(seed_ptr), rows, tile, tiles, p, part, rounds)
    cols = tile * 4 * part + tl.arange(0, part)
    drop_part(x, out, rows, cols, n_rows, n_cols, k0, scale)
    drop_part(x, out, rows, cols + part, n_rows, n_cols, k1, scale)
    drop_part(x, out, rows, cols + 2 * part, n_rows, n_cols, k2, scale)
    drop_part(x, out, rows, cols + 3 * part, n_rows, n_cols, k3, scale)


@triton.jit
def grad_part(low, a, out, rows, cols, ranks, n_rows, n_cols, rank, keep_part, scale):
    a_tile = tl.load(
        a + ranks[:, None] * n_cols + cols[None, :],
        mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols),
        other=0.0,
    )
    product = tl.dot(low, a_tile)  # (rows, part), float32
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    at = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    value = tl.where(keep_part, product * scale, 0.0)
    tl.store(out + at, value.to(out.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["n_rows", "rank", "tiles"])
def dropout_backward(low_ptr, a, out, seed_ptr, n_rows, n_cols, rank, tiles, p, scale,
             rows_per: tl.constexpr, part: tl.constexpr, ranks_per: tl.constexpr, rounds: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * rows_per + tl.arange(0, rows_per)
    tile = tl.program_id(1)
    ranks = tl.arange(0, ranks_per)
    low = tl.load(
        low_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :],
        mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank),
        other=0.0,
    )
    k0, k1, k2, k3 = keep(tl.load(seed_ptr), rows, tile, tiles, p, part, rounds)
    cols = tile * 4 * part + tl.arange(0, part)
    grad_part(low, a, out, rows, cols, ranks, n_rows, n_cols, rank, k0, scale)
    grad_part(low, a, out, rows, cols + part, ranks, n_rows, n_cols, rank, k1, scale)
    grad_part(low, a, out, rows, cols + 2 * part, ranks, n_rows, n_cols, rank, k2, scale)
    grad_part(low, a, out, rows, cols + 3 * part, ranks, n_rows, n_cols, rank, k3, scale)


# -- SwiGLU over LoRA-adapted gate and up (kernels.swiglu) --


@triton.jit
def plus_lowrank(base, low_ptr, b_ptr, rows, cols, n_rows, n_cols, low_width, first, rank,
                 ranks_per: tl.constexpr, a_rows: tl.constexpr):  # fmt: skip
    """base + low[:, first:first + rank] @ B.T over the tile, in float32: B (n_cols, rank), or
    with `a_rows` its transpose (rank, n_cols), as LoRA's A is stored."""
    ranks = tl.arange(0, ranks_per)
    low = tl.load(
        low_ptr + rows[:, None].to(tl.int64) * low_width + first + ranks[None, :],
        mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank),
        other=0.0,
    )
    if a_rows:
        b_at = ranks[:, None] * n_cols + cols[None, :]
    else:
        b_at = cols[None, :] * rank + ranks[:, None]
    b_tile = tl.load(
        b_ptr + b_at, mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols), other=0.0
    )
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    at = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    value = tl.load(base + at, mask=inside, other=0.0).to(tl.float32)
    return value + tl.dot(low, b_tile), at, inside


@triton.jit
def gate_and_up(gate, up, low, b_gate, b_up, rows, cols, n_rows, n_cols, rank_gate, rank_up,
                ranks_per: tl.constexpr):  # fmt: skip
    """The tile's adapted gate and up outputs, in float32 (gate's ranks first in `low`)."""
    width = rank_gate + rank_up
    g, at, inside = plus_lowrank(gate, low, b_gate, rows, cols, n_rows, n_cols, width, 0,
                                 rank_gate, ranks_per, False)  # fmt: skip
    u, _, _ = plus_lowrank(up, low, b_up, rows, cols, n_rows, n_cols, width, rank_gate,
                           rank_up, ranks_per, False)  # fmt: skip
    return g, u, at, inside


@triton.jit(do_not_specialize=["n_rows"])
def swiglu_forward(gate, up, low, b_gate, b_up, out, n_rows, n_cols,
                   rank_gate: tl.constexpr, rank_up: tl.constexpr, rows_per: tl.constexpr,
                   columns_per: tl.constexpr, ranks_per: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * rows_per + tl.arange(0, rows_per)
    cols = tl.program_id(1) * columns_per + tl.arange(0, columns_per)
    g, u, at, inside = gate_and_up(gate, up, low, b_gate, b_up, rows, cols, n_rows, n_cols,
                                   rank_gate, rank_up, ranks_per)  # fmt: skip
    h = g * tl.sigmoid(g) * u
    tl.store(out + at, h.to(out.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["n_rows", "rank_down"])
def swiglu_backward(gate, up, low, b_gate, b_up, grad, low_grad, a_down, n_rows, n_cols,
                    rank_gate: tl.constexpr, rank_up: tl.constexpr, rank_down,
                    rows_per: tl.constexpr, columns_per: tl.constexpr, ranks_per: tl.constexpr,
                    deferred: tl.constexpr):  # fmt: skip
    """With `deferred`, down_proj's adapter part of the gradient, low_grad @ a_down, is added
    to grad (its base part) as it is read."""
    rows = tl.program_id(0) * rows_per + tl.arange(0, rows_per)
    cols = tl.program_id(1) * columns_per + tl.arange(0, columns_per)
    g, u, at, inside = gate_and_up(gate, up, low, b_gate, b_up, rows, cols, n_rows, n_cols,
                                   rank_gate, rank_up, ranks_per)  # fmt: skip
    if deferred:  # the same sum, its tile of A (rank, n_cols) read as B.T's is
        d, _, _ = plus_lowrank(grad, low_grad, a_down, rows, cols, n_rows, n_cols, rank_down, 0,
                               rank_down, ranks_per, True)  # fmt: skip
    else:
        d = tl.load(grad + at, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(up + at, (d * silu).to(up.dtype.element_ty), mask=inside)
    tl.store(gate + at, (d * u * (sig + silu * (1 - sig))).to(gate.dtype.element_ty), mask=inside)
