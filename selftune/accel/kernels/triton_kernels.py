"""The Triton kernels (imported only where Triton is installed; the wrappers that call them,
and say why, are kernels.ce_rows, dropout, swiglu and decode_attention). At module level, as
Triton resolves the helpers a kernel calls among the module's globals."""

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
# is what lets the loads and stores be vectorised, which the forward's speed depends on
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


# -- one-token attention on a static KV cache (kernels.decode_attention) --


@triton.jit
def rotate(x1, x2, c1, c2, s1, s2):
    """RoPE's rotate-half form on the two halves of a head, in float32."""
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def decode_attention_split(q, k, v, cos, sin, keys, values, position, length, part_m, part_l,
                           part_acc,
                           scale, cache_len, chunk: tl.constexpr, group: tl.constexpr,
                           group_per: tl.constexpr, half: tl.constexpr, block: tl.constexpr,
                           splits: tl.constexpr):  # fmt: skip
    """One key/value head's queries over one chunk of the cache. The new token's query and key
    are rotated here; its key and value are attended from registers and written into the cache
    at `position` by the chunk that holds it (which also sets the cache's `length` past it);
    earlier positions are read from the cache. Writes the chunk's running max, sum and weighted
    values (log2 domain) for decode_attention_combine."""
    head = tl.program_id(0)
    split = tl.program_id(1)
    at = tl.load(position).to(tl.int32)
    start = split * chunk
    if start <= at:
        dim = 2 * half
        rows = tl.arange(0, group_per)
        live = rows < group
        heads = head * group + rows
        d = tl.arange(0, half)
        c1 = tl.load(cos + d).to(tl.float32)
        c2 = tl.load(cos + half + d).to(tl.float32)
        s1 = tl.load(sin + d).to(tl.float32)
        s2 = tl.load(sin + half + d).to(tl.float32)
        q_at = q + heads[:, None] * dim + d[None, :]
        q1 = tl.load(q_at, mask=live[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_at + half, mask=live[:, None], other=0.0).to(tl.float32)
        q1, q2 = rotate(q1, q2, c1, c2, s1, s2)
        kind = keys.dtype.element_ty
        q1 = q1.to(kind)  # rounded as the model's own RoPE rounds it
        q2 = q2.to(kind)
        base = head.to(tl.int64) * cache_len * dim
        end = tl.minimum(start + chunk, at)  # cached positions of this chunk, before `at`
        best = tl.full([group_per], float("-inf"), tl.float32)
        total = tl.zeros([group_per], tl.float32)
        acc1 = tl.zeros([group_per, half], tl.float32)
        acc2 = tl.zeros([group_per, half], tl.float32)
        for offset in range(0, chunk, block):  # a constant count: the interpreter takes no
            first = start + offset  # loop bounds read from memory
            if first < end:
                n = first + tl.arange(0, block)
                inside = n < end
                k_at = keys + base + n[:, None] * dim + d[None, :]
                k1 = tl.load(k_at, mask=inside[:, None], other=0.0)
                k2 = tl.load(k_at + half, mask=inside[:, None], other=0.0)
                score = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
                score = tl.where(inside[None, :], score * scale, float("-inf"))
                new_best = tl.maximum(best, tl.max(score, 1))
                fade = tl.exp2(best - new_best)
                p = tl.exp2(score - new_best[:, None])
                total = total * fade + tl.sum(p, 1)
                v_at = values + base + n[:, None] * dim + d[None, :]
                v1 = tl.load(v_at, mask=inside[:, None], other=0.0)
                v2 = tl.load(v_at + half, mask=inside[:, None], other=0.0)
                acc1 = acc1 * fade[:, None] + tl.dot(p.to(kind), v1)
                acc2 = acc2 * fade[:, None] + tl.dot(p.to(kind), v2)
                best = new_best
        if at < start + chunk:  # the new token: attended from registers, then cached
            k1 = tl.load(k + head * dim + d).to(tl.float32)
            k2 = tl.load(k + head * dim + half + d).to(tl.float32)
            k1, k2 = rotate(k1, k2, c1, c2, s1, s2)
            k1 = k1.to(kind)
            k2 = k2.to(kind)
            v1 = tl.load(v + head * dim + d)
            v2 = tl.load(v + head * dim + half + d)
            score = tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1)
            score = (score + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)) * scale
            new_best = tl.maximum(best, score)
            fade = tl.exp2(best - new_best)
            p = tl.exp2(score - new_best)
            total = total * fade + p
            p = p.to(kind).to(tl.float32)  # rounded as the cached ones are for their product
            acc1 = acc1 * fade[:, None] + p[:, None] * v1.to(tl.float32)[None, :]
            acc2 = acc2 * fade[:, None] + p[:, None] * v2.to(tl.float32)[None, :]
            best = new_best
            slot = base + at * dim + d
            tl.store(keys + slot, k1)
            tl.store(keys + slot + half, k2)
            tl.store(values + slot, v1)
            tl.store(values + slot + half, v2)
            if head == 0:
                tl.store(length, (at + 1).to(length.dtype.element_ty))
        part = heads * splits + split
        tl.store(part_m + part, best, mask=live)
        tl.store(part_l + part, total, mask=live)
        acc_at = part_acc + part[:, None] * dim + d[None, :]
        tl.store(acc_at, acc1, mask=live[:, None])
        tl.store(acc_at + half, acc2, mask=live[:, None])


@triton.jit
def decode_attention_combine(part_m, part_l, part_acc, out, position, chunk,
                             dim: tl.constexpr, splits: tl.constexpr):  # fmt: skip
    """One query head: the chunks up to `position` merged by their running maxima."""
    head = tl.program_id(0)
    used = tl.load(position).to(tl.int32) // chunk + 1
    s = tl.arange(0, splits)
    taken = s < used
    best = tl.load(part_m + head * splits + s, mask=taken, other=float("-inf"))
    total = tl.load(part_l + head * splits + s, mask=taken, other=0.0)
    weight = tl.exp2(best - tl.max(best, 0))
    d = tl.arange(0, dim)
    acc = tl.load(part_acc + (head * splits + s[:, None]) * dim + d[None, :], mask=taken[:, None],
                  other=0.0)  # fmt: skip
    value = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out + head * dim + d, value.to(out.dtype.element_ty))
