"""The decode attention's fp32 loops as explicit LLVM vector code (numba intrinsics).

A block of keys' scores for a KV head's query heads, and the block's value rows added into their
accumulators, are 256-512-long loops of multiply-adds. numba's loop vectorizer ran them one key
and one query head at a time, with each accumulator loaded and stored once per key: 11-17 GFMA/s
on one core of the test machine (an Intel Xeon doing 47 GFMA/s in torch's GEMM), and a 12B
sliding layer read its K/V at half the memory's rate. Here each is ``<16 x float>`` code (one
AVX-512 register, two AVX2 registers elsewhere) over register tiles:

* ``block_scores(q, lo, hi, rows, scales, first, nb, h, scale, p)``: ``p[qh, b] = scale * dot(q[qh],
  rows[first + b, h])``, tiles of up to 4 keys by 4 query heads sharing each load;
* ``block_values(a, lo, hi, p, nb, rows, scales, first, h)``: ``a[qh] += sum_b p[qh, b] * rows[first +
  b, h]``, tiles of up to 4 query heads by 64 columns kept in registers over the block's keys;
* ``pow2(n)``: ``2 ** n`` from exponent bits (the vectorizable ``exp`` of :mod:`.cpu_numba`).

For query heads ``qh`` in ``lo .. hi - 1`` and keys ``b`` in ``0 .. nb - 1``; ``q``/``a``
``[Hq, D]``, ``p`` ``[Hq, B]``, ``rows`` ``[R, Hkv, D]`` (a chunk of the KV cache), all
C-contiguous fp32; or int8 ``rows`` with each row's scale in ``scales`` ``[R, Hkv]`` (an int8
cache read as stored: the codes converted in the loads, a key's scale applied to its score and a
value's to its weight). A width that is not a multiple of 16 ends in a scalar loop. A query head's
sums run in the same order whichever tile it is in, so a position's attention has the same bits
alone or beside others.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _F32, _FAST, _I32, _I64, _V16B, _V16F, _row_ptr, _splat, _vload

LANES = 16
HEADS = 4  # query heads per pass over a row


@intrinsic
def pow2(typingctx, n):
    """``2 ** n`` for an integral fp32 ``n`` in -126 .. 127, from its exponent bits."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i = builder.fptosi(args[0], _I32)
        i = builder.shl(builder.add(i, ir.Constant(_I32, 127)), ir.Constant(_I32, 23))
        return builder.bitcast(i, ir.FloatType())

    return sig, codegen


def _check_float(*tys):
    for ty, ndim in tys:
        if not (isinstance(ty, types.Array) and ty.ndim == ndim and ty.dtype == types.float32 and ty.layout == "C"):
            raise TypeError(f"expected a C-contiguous {ndim}-D fp32 array, got {ty}")


def _i64(builder, v):
    return builder.sext(v, _I64) if v.type.width < 64 else v


def _tree_sum(builder, vec):
    """The sum of a ``<16 x float>`` in a fixed order: halves added pairwise, 16 -> 8 -> 4 -> 2 -> 1
    (an ordered reduction would be 16 dependent additions)."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        vec = builder.fadd(lo, hi, flags=_FAST)
    return builder.extract_element(vec, ir.Constant(_I32, 0))


def _tiles(builder, lo, hi, sizes, body):
    """Call ``body(i, n)`` over ``lo .. hi - 1`` in tiles of ``n`` = each of ``sizes`` in turn (the
    largest first, then what is left)."""
    i_ptr = cgutils.alloca_once_value(builder, lo)
    for n in sizes:
        cond = builder.append_basic_block(f"tiles{n}.cond")
        loop = builder.append_basic_block(f"tiles{n}.body")
        done = builder.append_basic_block(f"tiles{n}.done")
        builder.branch(cond)
        builder.position_at_end(cond)
        i = builder.load(i_ptr)
        builder.cbranch(builder.icmp_signed("<=", builder.add(i, ir.Constant(_I64, n)), hi), loop, done)
        builder.position_at_end(loop)
        body(i, n)
        builder.store(builder.add(i, ir.Constant(_I64, n)), i_ptr)
        builder.branch(cond)
        builder.position_at_end(done)


def _vector_loop(builder, width, body):
    """``body(j)`` for ``j`` = 0, 16, .. over the whole vectors of ``width``; returns the first
    index left to a scalar tail."""
    count = builder.udiv(width, ir.Constant(_I64, LANES))
    with cgutils.for_range(builder, count) as loop:
        body(builder.mul(loop.index, ir.Constant(_I64, LANES)))
    return builder.mul(count, ir.Constant(_I64, LANES))


def _const(n):
    return ir.Constant(_I64, n)


def _rows_view(context, builder, ty, value):
    """``(data, rows stride, heads stride)`` in elements of a C-contiguous ``[R, H, D]`` array."""
    arr = context.make_array(ty)(context, builder, value)
    heads = builder.extract_value(arr.shape, 1)
    d = builder.extract_value(arr.shape, 2)
    return arr.data, builder.mul(heads, d), d


def _key_row(builder, data, row_stride, head_stride, first, b, h):
    at = builder.add(builder.mul(builder.add(first, b), row_stride), builder.mul(h, head_stride))
    return builder.gep(data, [at])


def _check_rows(rows, scales):
    if not (isinstance(rows, types.Array) and rows.ndim == 3 and rows.layout == "C"
            and rows.dtype in (types.float32, types.int8)):
        raise TypeError(f"expected a C-contiguous 3-D fp32 or int8 array of K/V rows, got {rows}")
    _check_float((scales, 2))


def _vector_at(builder, ptr, j, quantized):
    """16 values of a K/V row from ``j`` as ``<16 x float>`` (int8 codes converted; their scale is
    applied by the caller, once per row)."""
    return builder.sitofp(_vload(builder, ptr, j, _V16B), _V16F) if quantized else _vload(builder, ptr, j, _V16F)


def _scalar_at(builder, ptr, j, quantized):
    x = builder.load(builder.gep(ptr, [j]))
    return builder.sitofp(x, _F32) if quantized else x


def _row_scale(builder, scales, heads, first, b, h):
    """An int8 row's scale: ``scales[first + b, h]`` of a ``[R, Hkv]`` fp32 array."""
    return builder.load(builder.gep(scales, [builder.add(builder.mul(builder.add(first, b), heads), h)]))


@intrinsic
def block_scores(typingctx, q, lo, hi, rows, scales, first, nb, h, scale, p):
    """``p[qh, b] = scale * dot(q[qh], key)`` with ``key = rows[first + b, h]`` (times
    ``scales[first + b, h]`` for int8 rows) for query heads ``qh`` in ``lo .. hi - 1`` and keys
    ``b`` in ``0 .. nb - 1`` (``q`` ``[Hq, D]``, ``rows`` ``[R, Hkv, D]`` fp32 or int8,
    ``scales`` ``[R, Hkv]``, unused for fp32 rows; ``p`` ``[Hq, B]``). Tiles of up to 4 keys by 4
    heads share each vector load."""
    _check_float((q, 2), (p, 2))
    _check_rows(rows, scales)
    sig = types.void(q, lo, hi, rows, scales, first, nb, h, scale, p)
    quantized = rows.dtype == types.int8

    def codegen(context, builder, signature, args):
        qa = context.make_array(signature.args[0])(context, builder, args[0])
        pa = context.make_array(signature.args[9])(context, builder, args[9])
        sa = context.make_array(signature.args[4])(context, builder, args[4])
        data, rs, hs = _rows_view(context, builder, signature.args[3], args[3])
        heads = builder.extract_value(sa.shape, 1)
        lo_, hi_, first_, nb_, h_ = (_i64(builder, args[i]) for i in (1, 2, 5, 6, 7))
        scale_ = context.cast(builder, args[8], signature.args[8], types.float32)
        d = builder.extract_value(qa.shape, 1)
        pw = builder.extract_value(pa.shape, 1)
        zero = ir.Constant(_V16F, [0.0] * LANES)

        def head_tile(qh, n):
            qrows = [_row_ptr(builder, qa, builder.add(qh, _const(i)), d) for i in range(n)]

            def key_tile(b, m):
                krows = [_key_row(builder, data, rs, hs, first_, builder.add(b, _const(k)), h_) for k in range(m)]
                accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(m)] for _ in range(n)]

                def step(j):
                    kv = [_vector_at(builder, kr, j, quantized) for kr in krows]
                    for qr, acc_row in zip(qrows, accs):
                        qv = _vload(builder, qr, j, _V16F)
                        for k, acc in zip(kv, acc_row):
                            builder.store(builder.fadd(builder.load(acc), builder.fmul(qv, k, flags=_FAST),
                                                       flags=_FAST), acc)

                tail = _vector_loop(builder, d, step)
                sums = [[cgutils.alloca_once_value(builder, _tree_sum(builder, builder.load(acc))) for acc in acc_row]
                        for acc_row in accs]
                with cgutils.for_range_slice(builder, tail, d, _const(1), inc=True) as (j, _):
                    kv = [_scalar_at(builder, kr, j, quantized) for kr in krows]
                    for qr, sum_row in zip(qrows, sums):
                        qv = builder.load(builder.gep(qr, [j]))
                        for k, s in zip(kv, sum_row):
                            builder.store(builder.fadd(builder.load(s), builder.fmul(qv, k, flags=_FAST), flags=_FAST), s)
                key_scales = [scale_] * m
                if quantized:
                    key_scales = [builder.fmul(scale_, _row_scale(builder, sa.data, heads, first_, builder.add(b, _const(k)),
                                                                  h_), flags=_FAST) for k in range(m)]
                for i, sum_row in enumerate(sums):
                    for k, s in enumerate(sum_row):
                        at = builder.add(builder.mul(builder.add(qh, _const(i)), pw), builder.add(b, _const(k)))
                        builder.store(builder.fmul(builder.load(s), key_scales[k], flags=_FAST),
                                      builder.gep(pa.data, [at]))

            _tiles(builder, _const(0), nb_, (4, 1), key_tile)

        _tiles(builder, lo_, hi_, (4, 2, 1), head_tile)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def block_values(typingctx, a, lo, hi, p, nb, rows, scales, first, h):
    """``a[qh] += sum over b of p[qh, b] * value`` with ``value = rows[first + b, h]`` (times
    ``scales[first + b, h]`` for int8 rows) for query heads ``qh`` in ``lo .. hi - 1`` and keys
    ``b`` in ``0 .. nb - 1`` (``a`` ``[Hq, D]``, ``p`` ``[Hq, B]``, ``rows``/``scales`` as
    :func:`block_scores` takes them). Tiles of up to 4 heads by 64 columns stay in registers over
    the keys: each accumulator is loaded and stored once per block, not once per key."""
    _check_float((a, 2), (p, 2))
    _check_rows(rows, scales)
    sig = types.void(a, lo, hi, p, nb, rows, scales, first, h)
    quantized = rows.dtype == types.int8

    def codegen(context, builder, signature, args):
        aa = context.make_array(signature.args[0])(context, builder, args[0])
        pa = context.make_array(signature.args[3])(context, builder, args[3])
        sa = context.make_array(signature.args[6])(context, builder, args[6])
        data, rs, hs = _rows_view(context, builder, signature.args[5], args[5])
        kv_heads = builder.extract_value(sa.shape, 1)
        lo_, hi_, nb_, first_, h_ = (_i64(builder, args[i]) for i in (1, 2, 4, 7, 8))
        d = builder.extract_value(aa.shape, 1)
        pw = builder.extract_value(pa.shape, 1)

        def weight(qh, b):
            """``p[qh, b]``, times the value row's scale for int8 rows."""
            w = builder.load(builder.gep(pa.data, [builder.add(builder.mul(qh, pw), b)]))
            if quantized:
                w = builder.fmul(w, _row_scale(builder, sa.data, kv_heads, first_, b, h_), flags=_FAST)
            return w

        def head_tile(qh, n):
            heads = [builder.add(qh, _const(i)) for i in range(n)]
            arows = [_row_ptr(builder, aa, hh, d) for hh in heads]

            def column_tile(col, width):  # width vectors of 16 columns from column col
                offsets = [builder.add(col, _const(LANES * c)) for c in range(width)]
                accs = [[cgutils.alloca_once_value(builder, _vload(builder, ar, o, _V16F)) for o in offsets]
                        for ar in arows]
                with cgutils.for_range(builder, nb_) as loop:
                    vr = _key_row(builder, data, rs, hs, first_, loop.index, h_)
                    vv = [_vector_at(builder, vr, o, quantized) for o in offsets]
                    for hh, acc_row in zip(heads, accs):
                        e = _splat(builder, weight(hh, loop.index), _V16F)
                        for v, acc in zip(vv, acc_row):
                            builder.store(builder.fadd(builder.load(acc), builder.fmul(e, v, flags=_FAST),
                                                       flags=_FAST), acc)
                for ar, acc_row in zip(arows, accs):
                    for o, acc in zip(offsets, acc_row):
                        builder.store(builder.load(acc), builder.bitcast(builder.gep(ar, [o]), _V16F.as_pointer()),
                                      align=1)

            whole = builder.udiv(d, _const(LANES))

            def vector_tile(c, width):
                column_tile(builder.mul(c, _const(LANES)), width)

            _tiles(builder, _const(0), whole, (4, 1), vector_tile)
            tail = builder.mul(whole, _const(LANES))
            with cgutils.for_range_slice(builder, tail, d, _const(1), inc=True) as (j, _):
                for hh, ar in zip(heads, arows):
                    ptr = builder.gep(ar, [j])
                    s = cgutils.alloca_once_value(builder, builder.load(ptr))
                    with cgutils.for_range(builder, nb_) as loop:
                        vr = _key_row(builder, data, rs, hs, first_, loop.index, h_)
                        prod = builder.fmul(weight(hh, loop.index), _scalar_at(builder, vr, j, quantized), flags=_FAST)
                        builder.store(builder.fadd(builder.load(s), prod, flags=_FAST), s)
                    builder.store(builder.load(s), ptr)

        _tiles(builder, lo_, hi_, (4, 2, 1), head_tile)
        return context.get_dummy_value()

    return sig, codegen
