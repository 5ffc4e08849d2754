"""Row dot products of quantized weights as explicit LLVM vector code (numba intrinsics).

numba's loop vectorizer handles ``sum_k x[k] * code[k] * scale[k // 32]`` only partly (the scale
index changes inside a vector) and turns a nested per-group loop into scalar code. These intrinsics
write the loop the way the hardware wants it: per group of 32 weights, load the codes as a vector,
convert them to fp32, multiply by the activations, scale the group's partial products once and
accumulate in a vector register; one horizontal sum per row. LLVM picks the instructions for the
machine numba compiles for (AVX2 or AVX-512 here).

Callable from any ``@njit`` function:

* ``dot_int8(x, t, codes, scales, n)``: ``sum_k x[t, k] * codes[n, k] * scales[n, k // 32]``;
* ``dot_int4(x, t, xsum, codes, scales, mins, n)``: the same for an int4 row (byte ``j`` of a group
  holds weight ``j`` in the low nibble and ``j + 16`` in the high one; ``w = q * scale + min``),
  with ``xsum[t, g]`` the sum of group ``g`` of ``x[t]`` (for the minimums);
* ``dot_planes(x, t, xsum, high, low, scales, n)``: an int8 row stored as two such nibble planes
  (``code = 16 * (high - 8) + low``); ``dot_screen(...)``: its estimate from the high plane alone
  (half the bytes; the vocabulary head screens its rows with it, see ``cpu_numba.head_topk``).

``x`` is fp32 ``[T, K]``; ``codes`` int8 ``[N, K]`` / uint8 ``[N, K // 2]``; ``scales``/``mins``
``[N, K // 32]`` either fp32 or IEEE half stored as uint16 (numba has no fp16 type on the CPU; the
intrinsic converts). Every array must be C-contiguous (the wrappers in :mod:`.ops` make sure).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

GROUP = 32
_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)
_V16B = ir.VectorType(_I8, 16)
_FAST = ("fast",)


def _check_scales(ty, what: str):
    if not isinstance(ty, types.Array) or ty.dtype not in (types.float32, types.uint16):
        raise TypeError(f"{what} must be a float32 or uint16 (IEEE half) array, got {ty}")


def _row_ptr(builder, arr, row, width):
    """Pointer to ``arr[row, 0]`` of a C-contiguous 2-D array."""
    row = builder.sext(row, _I64) if row.type.width < 64 else row
    return builder.gep(arr.data, [builder.mul(row, width)])


def _load_scale(builder, ptr, index, is_half: bool):
    v = builder.load(builder.gep(ptr, [index]))
    if is_half:
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)
    return v


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(_V16F, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_V16F, ir.Undefined), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


def _vload(builder, base, offset, vtype):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer()), align=1)


def _hsum(builder, vec):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _V16F]),
                                        "llvm.vector.reduce.fadd.v16f32")
    return builder.call(fn, [ir.Constant(_F32, 0.0), vec], fastmath=_FAST)


@intrinsic
def dot_int8(typingctx, x, t, codes, scales, n):
    _check_scales(scales, "scales")
    sig = types.float32(x, t, codes, scales, n)
    half = scales.dtype == types.uint16

    def codegen(context, builder, signature, args):
        xa, tv, ca, sa, nv = args
        xs = context.make_array(signature.args[0])(context, builder, xa)
        cs = context.make_array(signature.args[2])(context, builder, ca)
        ss = context.make_array(signature.args[3])(context, builder, sa)
        k = builder.extract_value(cs.shape, 1)
        g_n = builder.extract_value(ss.shape, 1)
        xrow = _row_ptr(builder, xs, tv, builder.extract_value(xs.shape, 1))
        wrow = _row_ptr(builder, cs, nv, k)
        srow = _row_ptr(builder, ss, nv, g_n)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
        with cgutils.for_range(builder, g_n) as loop:
            base = builder.mul(loop.index, ir.Constant(_I64, GROUP))
            prods = None
            for h in range(2):
                off = builder.add(base, ir.Constant(_I64, 16 * h))
                w = builder.sitofp(_vload(builder, wrow, off, _V16B), _V16F)
                p = builder.fmul(_vload(builder, xrow, off, _V16F), w, flags=_FAST)
                prods = p if prods is None else builder.fadd(prods, p, flags=_FAST)
            scale = _splat(builder, _load_scale(builder, srow, loop.index, half))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(prods, scale, flags=_FAST), flags=_FAST), acc)
        return _hsum(builder, builder.load(acc))

    return sig, codegen


def _nibbles(builder, row, g, xrow, base):
    """Group ``g`` of a nibble-packed row against ``x``: the vector ``x_lo * low + x_hi * high``
    (byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one)."""
    packed = _vload(builder, row, builder.mul(g, ir.Constant(_I64, 16)), _V16B)
    lo = builder.uitofp(builder.and_(packed, ir.Constant(_V16B, [15] * 16)), _V16F)
    hi = builder.uitofp(builder.lshr(packed, ir.Constant(_V16B, [4] * 16)), _V16F)
    x_lo = _vload(builder, xrow, base, _V16F)
    x_hi = _vload(builder, xrow, builder.add(base, ir.Constant(_I64, 16)), _V16F)
    return builder.fadd(builder.fmul(x_lo, lo, flags=_FAST), builder.fmul(x_hi, hi, flags=_FAST), flags=_FAST)


def _nibble_dot(context, builder, signature, args, mode: str):
    """The int4-style dot products. ``mode``:

    * ``"int4"``: ``args = (x, t, xsum, codes, scales, mins, n)``, ``w = q * scale + min``;
    * ``"planes"``: ``args = (x, t, xsum, high, low, scales, n)``: int8 codes split in two nibble
      planes, ``code = 16 * (high - 8) + low``, ``w = code * scale``;
    * ``"screen"``: the same arguments, the high plane only, each low nibble taken as 7.5 (the
      middle of its range): ``w ~ (16 * (high - 8) + 7.5) * scale``."""
    xa, tv, sua, ca, second, sa, nv = args
    tys = signature.args
    xs = context.make_array(tys[0])(context, builder, xa)
    sus = context.make_array(tys[2])(context, builder, sua)
    cs = context.make_array(tys[3])(context, builder, ca)
    ss = context.make_array(tys[5])(context, builder, sa)
    second_arr = context.make_array(tys[4])(context, builder, second)
    g_n = builder.extract_value(ss.shape, 1)
    half_s = tys[5].dtype == types.uint16
    xrow = _row_ptr(builder, xs, tv, builder.extract_value(xs.shape, 1))
    sumrow = _row_ptr(builder, sus, tv, builder.extract_value(sus.shape, 1))
    wrow = _row_ptr(builder, cs, nv, builder.extract_value(cs.shape, 1))
    srow = _row_ptr(builder, ss, nv, g_n)
    srow2 = _row_ptr(builder, second_arr, nv, builder.extract_value(second_arr.shape, 1))
    acc = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
    macc = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
    sixteen = _splat(builder, ir.Constant(_F32, 16.0))
    with cgutils.for_range(builder, g_n) as loop:
        g = loop.index
        base = builder.mul(g, ir.Constant(_I64, GROUP))
        prods = _nibbles(builder, wrow, g, xrow, base)
        scale = _load_scale(builder, srow, g, half_s)
        if mode == "int4":
            offset = _load_scale(builder, srow2, g, tys[4].dtype == types.uint16)
        else:
            prods = builder.fmul(prods, sixteen, flags=_FAST)
            if mode == "planes":
                prods = builder.fadd(prods, _nibbles(builder, srow2, g, xrow, base), flags=_FAST)
            offset = builder.fmul(scale, ir.Constant(_F32, -128.0 if mode == "planes" else -120.5), flags=_FAST)
        builder.store(builder.fadd(builder.load(acc), builder.fmul(prods, _splat(builder, scale), flags=_FAST),
                                   flags=_FAST), acc)
        m = builder.fmul(offset, builder.load(builder.gep(sumrow, [g])), flags=_FAST)
        builder.store(builder.fadd(builder.load(macc), m, flags=_FAST), macc)
    return builder.fadd(_hsum(builder, builder.load(acc)), builder.load(macc), flags=_FAST)


@intrinsic
def dot_int4(typingctx, x, t, xsum, codes, scales, mins, n):
    _check_scales(scales, "scales")
    _check_scales(mins, "mins")
    sig = types.float32(x, t, xsum, codes, scales, mins, n)

    def codegen(context, builder, signature, args):
        x, t, xsum, codes, scales, mins, n = args
        a = signature.args
        order = types.float32(a[0], a[1], a[2], a[3], a[5], a[4], a[6])
        return _nibble_dot(context, builder, order, (x, t, xsum, codes, mins, scales, n), "int4")

    return sig, codegen


@intrinsic
def dot_planes(typingctx, x, t, xsum, high, low, scales, n):
    """Row ``n`` of an int8 matrix stored as two nibble planes (see :func:`_nibble_dot`)."""
    _check_scales(scales, "scales")
    return types.float32(x, t, xsum, high, low, scales, n), \
        lambda context, builder, sig, args: _nibble_dot(context, builder, sig, args, "planes")


@intrinsic
def dot_screen(typingctx, x, t, xsum, high, low, scales, n):
    """Approximate row ``n`` of a nibble-plane int8 matrix from its high plane alone: the error is
    at most ``sum_k |x_k| * 7.5 * scale`` (each low nibble is 0..15, taken as 7.5)."""
    _check_scales(scales, "scales")
    return types.float32(x, t, xsum, high, low, scales, n), \
        lambda context, builder, sig, args: _nibble_dot(context, builder, sig, args, "screen")
