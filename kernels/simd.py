"""Row dot products of quantized weights as explicit LLVM vector code (numba intrinsics).

Activations are quantized per group of 32 in two int8 parts, ``x ~ xd * xq + xd2 * xq2`` (``xq2``
quantizes what ``xq`` leaves, with ``xd2 = xd / 254``: about 15 bits), or in one part,
``x ~ xd * xq`` (llama.cpp's Q8 activations). Products with int8 weights take two parts: with
one, the 270M's greedy tokens differed from fp32 at 1-3 more positions of 256 (logit margins
0.01-0.13), for 2-5% less time per token. Products with int4 weights, whose own rounding is 8x
coarser, and the vocabulary head's screen take the first part (:func:`first_part`). A group's
dot product is then
one or two integer sums, each of which one AVX-VNNI /
AVX512-VNNI instruction (``vpdpbusd``: unsigned bytes times signed bytes, summed in 32-bit lanes)
computes for 32 weights; its 8 lanes are converted to fp32, scaled by the group's two scales and
accumulated, with one horizontal sum per row. Machines without VNNI get the same integer sums in
fp32 arithmetic (exact: every product and every group sum of a group is an integer below 2^24), so
results do not depend on the instruction set beyond the order of the final fp32 additions.

int4 rows on 512-bit VNNI go four groups at a time with the activations shuffled to the codes'
nibble order instead (``int4_quad`` in :func:`_qdot`): a conversion and a multiply-add per 128
weights instead of per 64, and no shuffle of the codes. Its arithmetic per byte was the limit of
the 12B's decode (one core computed 21 GB/s of int4 rows held in cache, 2 cores about the memory's
rate); it computes 43 GB/s per core, and 2 cores stream the 12B's rows at the measured bandwidth.

numba's own loop vectorizer handles neither the per-group scales nor byte arithmetic well (a
nested per-group loop became scalar code, 4x slower); these intrinsics write the loop out.

The weight side of each format becomes, per group, 32 unsigned bytes ``U`` and a correction:

* ``int8``: ``U = code + 128`` (the sign bit flipped), correction ``-128 * sum(xq)``;
* ``int4``: ``U = q`` (the nibbles in weight order), ``w = q * scale + min``: the minimum times the
  group's sum of the dequantized activations; ``scale`` and ``min`` come from the group's
  super-block (fp16 ``d``/``dmin`` times 8-bit sub-scales, see :mod:`.qweight`);
* ``planes`` (an int8 matrix stored as a high and a low nibble plane, see ``kernels.qweight.to_planes``):
  ``U = 16 * high + low = code + 128``, as int8;
* ``screen``: the high plane alone, each low nibble taken as 7.5: ``U = 16 * high``, correction
  ``-120.5 * sum(xq)``: half the bytes, with a known error bound (the vocabulary head's screen).

Callable from any ``@njit`` function: ``dot_int8(xa, t, codes, scales, n)``,
``dot_int4(xa, t, codes, meta, n)`` (``meta``: the super-block bytes viewed as fp32 ``[N, S * 5]``), ``dot_planes(xa, t, high, low, scales, n)``,
``dot_screen(...)`` (same arguments). ``xa``: ``(xq, xd, xs)`` from
``cpu_numba.quantize_activations`` or ``(xq, xq2, xd, xd2, xs, xs1)`` from
``cpu_numba.quantize_activations_fine``: int8 ``[T, K]`` parts, their scales ``[T, K // 32]`` and
``xs[t, g]`` the group's sum of the dequantized activations (these per-group arrays padded with
zeros to a multiple of 8 groups, ``cpu_numba.padded_groups``); ``codes`` int8/uint8 ``[N, K]``
or packed nibbles ``[N, K // 2]``; ``scales``/``mins`` fp32 ``[N, K // 32]``. Every array must be
C-contiguous (the wrappers in :mod:`.ops` make sure).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .layout import GROUP, META, SUPER, SUPER_SCALE

# software prefetch distance in bytes ahead in the weight rows (measured 512-16384: 4096 best)
PREFETCH = 4096
# the screen's correction per unit of a group's activation sum: the codes' offset of 128, less the
# 7.5 every low nibble is taken as (U = 16 * high stands for code + 128 - 7.5)
SCREEN_CORRECTION = -120.5
_F32 = ir.FloatType()
_F16 = ir.HalfType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(_F32, 8)
_V8B = ir.VectorType(_I8, 8)
_V16B = ir.VectorType(_I8, 16)
_V32B = ir.VectorType(_I8, 32)
_V32F = ir.VectorType(_F32, 32)
_V64B = ir.VectorType(_I8, 64)
_V16I = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(_F32, 16)
# fast-math without reassociation: the sums keep the order written here wherever a kernel is
# inlined, so a position's product is the same bits alone or beside others (LLVM reordered them
# differently in different loops under "fast"); multiply-adds may still fuse
_FAST = ("nnan", "ninf", "nsz", "arcp", "contract", "afn")


def _has_vnni() -> bool:
    features = llvm.get_host_cpu_features()
    return bool(features.get("avxvnni") or (features.get("avx512vnni") and features.get("avx512vl")))


def _has_wide_vnni() -> bool:
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw") and features.get("avx512f"))


HAS_VNNI = _has_vnni()  # numba compiles for the host CPU; its on-disk cache is keyed by it too
# 512-bit VNNI: two groups per instruction (see _qdot); else one group per 256-bit instruction
WIDE = HAS_VNNI and _has_wide_vnni()


def _row_ptr(builder, arr, row, width):
    """Pointer to ``arr[row, 0]`` of a C-contiguous 2-D array."""
    row = builder.sext(row, _I64) if row.type.width < 64 else row
    return builder.gep(arr.data, [builder.mul(row, width)])


def _vload(builder, base, offset, vtype):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vtype.as_pointer()), align=1)


def _splat(builder, value, vtype):
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))


def _prefetch(builder, base, offset):
    """A read prefetch of ``base[offset]`` into every cache level (``prefetcht0``; ``prefetcht1``
    measured the same for the head's pass 2)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    ptr = builder.bitcast(builder.gep(base, [offset]), _I8.as_pointer())
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _bytes(value, n=16):
    return ir.Constant(ir.VectorType(_I8, n), [value] * n)


def _concat(builder, lo, hi):
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _group_sum(builder, u, xq):
    """The integer dot product of 32 unsigned bytes ``u`` and 32 signed bytes ``xq``, as an
    ``<8 x float>`` of partial sums (``vpdpbusd``; or the same sums in exact fp32 arithmetic)."""
    if HAS_VNNI:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V8I, _V8I, _V8I]),
                                            "llvm.x86.avx512.vpdpbusd.256")
        s = builder.call(fn, [ir.Constant(_V8I, [0] * 8), builder.bitcast(u, _V8I), builder.bitcast(xq, _V8I)])
        return builder.sitofp(s, _V8F)
    p = builder.fmul(builder.uitofp(u, _V32F), builder.sitofp(xq, _V32F), flags=_FAST)
    out = None
    for i in range(4):  # 32 products -> 8 partial sums (integers below 2^24: exact)
        part = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_I32, 8), list(range(8 * i, 8 * i + 8))))
        out = part if out is None else builder.fadd(out, part, flags=_FAST)
    return out


def _dot512(builder, acc, u, xq):
    """``acc`` (``<16 x i32>``, or None for zeros) plus the sums of 4 products of 64 unsigned bytes
    ``u`` and 64 signed bytes ``xq`` in each 32-bit lane (``vpdpbusd`` on 512 bits)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I, [_V16I, _V16I, _V16I]),
                                        "llvm.x86.avx512.vpdpbusd.512")
    acc = ir.Constant(_V16I, [0] * 16) if acc is None else acc
    return builder.call(fn, [acc, builder.bitcast(u, _V16I), builder.bitcast(xq, _V16I)])


def _pair_sum(builder, u, xq):
    """:func:`_group_sum` of two groups at once (64 bytes each side; ``vpdpbusd`` on 512 bits): an
    ``<16 x float>``, lanes 0-7 the first group's partial sums, 8-15 the second's."""
    return builder.sitofp(_dot512(builder, None, u, xq), _V16F)


def _hsum(builder, vec):
    n = vec.type.count
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, vec.type]),
                                        f"llvm.vector.reduce.fadd.v{n}f32")
    return builder.call(fn, [ir.Constant(_F32, 0.0), vec], fastmath=_FAST)


def _super_block_scales(builder, srow, g):
    """Group ``g``'s ``(scale, min)`` as fp32 from its super-block's bytes (row ``srow``, an fp32
    pointer to the row's super-blocks): ``d * sc``, ``-dmin * mn`` (``d``/``dmin`` fp16, stored
    times ``SUPER_SCALE``)."""
    meta = builder.bitcast(srow, _I8.as_pointer())
    sb = builder.udiv(g, ir.Constant(_I64, SUPER))
    j = builder.urem(g, ir.Constant(_I64, SUPER))
    base = builder.mul(sb, ir.Constant(_I64, META))

    def half(offset):
        ptr = builder.bitcast(builder.gep(meta, [builder.add(base, ir.Constant(_I64, offset))]), _F16.as_pointer())
        return builder.fpext(builder.load(ptr, align=1), _F32)

    def byte(offset):
        return builder.uitofp(builder.load(builder.gep(meta, [builder.add(base, builder.add(j, ir.Constant(_I64, offset)))])), _F32)

    inv = ir.Constant(_F32, 1.0 / SUPER_SCALE)
    d = builder.fmul(half(0), inv, flags=_FAST)
    dmin = builder.fmul(half(2), inv, flags=_FAST)
    scale = builder.fmul(d, byte(4), flags=_FAST)
    minimum = builder.fsub(ir.Constant(_F32, 0.0), builder.fmul(dmin, byte(4 + SUPER), flags=_FAST), flags=_FAST)
    return scale, minimum


def _check(*arrays):
    for ty, dtypes in arrays:
        if not isinstance(ty, types.Array) or ty.dtype not in dtypes:
            raise TypeError(f"expected an array of {dtypes}, got {ty}")


_WEIGHT = (types.int8, types.uint8)
_FLOAT = (types.float32,)
# the screen's scales may also come as fp16 bits (uint16): half the bytes of fp32 where every
# scale is an fp16 value (a GGUF Q8_0 head), converted in the load, so the same estimates
_SCREEN_SCALES = (types.float32, types.uint16)
_I16 = ir.IntType(16)


def _scale_at(builder, srow, g):
    """Scale ``g`` of a row of fp32 scales, or of fp16 bits (``srow`` an i16 pointer), as fp32."""
    value = builder.load(builder.gep(srow, [g]))
    if srow.type.pointee == _I16:
        value = builder.fpext(builder.bitcast(value, _F16), _F32)
    return value


def _octet_scales(builder, srow, o, mode):
    """The 8 groups of octet ``o``: ``(scales, mins)`` as ``<8 x float>`` (``mins`` None but for
    int4). int8 layouts read 8 fp32 scales; int4 reads its super-block (octet ``o`` is super-block
    ``o``): ``d * sc`` and ``-dmin * mn``."""
    if mode != "int4":
        at = builder.mul(o, ir.Constant(_I64, SUPER))
        if srow.type.pointee == _I16:  # fp16 bits
            bits = _vload(builder, srow, at, ir.VectorType(_I16, 8))
            return builder.fpext(builder.bitcast(bits, ir.VectorType(_F16, 8)), _V8F), None
        return _vload(builder, srow, at, _V8F), None
    meta = builder.bitcast(srow, _I8.as_pointer())
    base = builder.mul(o, ir.Constant(_I64, META))

    def half(offset):
        ptr = builder.bitcast(builder.gep(meta, [builder.add(base, ir.Constant(_I64, offset))]), _F16.as_pointer())
        value = builder.fmul(builder.fpext(builder.load(ptr, align=1), _F32), ir.Constant(_F32, 1.0 / SUPER_SCALE),
                             flags=_FAST)
        return _splat(builder, value, _V8F)

    def bytes8(offset):
        return builder.uitofp(_vload(builder, meta, builder.add(base, ir.Constant(_I64, offset)), _V8B), _V8F)

    scales = builder.fmul(half(0), bytes8(4), flags=_FAST)
    mins = builder.fsub(ir.Constant(_V8F, [0.0] * 8), builder.fmul(half(2), bytes8(4 + SUPER), flags=_FAST), flags=_FAST)
    return scales, mins


def _qdot(context, builder, sig, args, mode: str, rows: int = 1):
    """``sum_g scale_g * (xd_g * dot(U_g, xq_g) + xd2_g * dot(U_g, xq2_g)) + correction_g`` over
    the groups of row ``n``, for activation rows ``t .. t + rows - 1`` (``rows`` 1, 2 or 4: each
    weight group is loaded and unpacked once for all of them). ``args``: ``(xa, t, codes, second,
    scales, n)`` with ``xa`` the activation tuple, ``second`` the low plane (unused otherwise) and
    ``scales`` fp32 per group, or for int4 the super-block bytes. Returns a float, or a tuple of
    ``rows`` floats.

    The groups go by octets (8 groups; an int4 super-block): the octet's 8 scales, times each
    activation part's 8 scales, are one vector product, and its 8 corrections one vector
    multiply-add; a group's own work is its unpacking, one ``vpdpbusd`` per activation part, the
    conversion and one multiply-add. Groups past the last whole octet go one by one."""
    xa, tv, ca, sa2, sa, nv = args
    ty = sig.args
    per_row = []  # per activation row: ([(xq row, xd row), ...], xs row)
    for r in range(rows):
        t = builder.add(tv, ir.Constant(tv.type, r)) if r else tv
        parts = []
        for i in range(len(ty[0])):  # (xq, xd, xs) or (xq, xq2, xd, xd2, xs, xs1)
            a = context.make_array(ty[0].types[i])(context, builder, builder.extract_value(xa, i))
            parts.append(_row_ptr(builder, a, t, builder.extract_value(a.shape, 1)))
        if len(parts) == 3:
            per_row.append(([(parts[0], parts[1])], parts[2]))
        else:
            per_row.append(([(parts[0], parts[2]), (parts[1], parts[3])], parts[4]))
    arr = lambda i, v: context.make_array(ty[i])(context, builder, v)  # noqa: E731
    cs, s2, ss = arr(2, ca), arr(3, sa2), arr(4, sa)
    code_width = builder.extract_value(cs.shape, 1)
    step = GROUP if mode == "int8" else GROUP // 2  # bytes of a group's codes
    g_n = builder.udiv(code_width, ir.Constant(_I64, step))
    wrow = _row_ptr(builder, cs, nv, code_width)
    row2 = _row_ptr(builder, s2, nv, builder.extract_value(s2.shape, 1))
    srow = _row_ptr(builder, ss, nv, builder.extract_value(ss.shape, 1))
    # independent accumulators per activation row, the same for every row count: a position then
    # sums in the same order whether it is alone or one of a verification's, bit for bit
    n_acc = 4
    zero8 = ir.Constant(_V8F, [0.0] * 8)
    accs = [[cgutils.alloca_once_value(builder, zero8) for _ in range(n_acc)] for _ in range(rows)]
    corrs = [cgutils.alloca_once_value(builder, zero8) for _ in range(rows)]  # per-group corrections, 8 lanes
    zero16 = ir.Constant(_V16F, [0.0] * 16)
    wide = [[cgutils.alloca_once_value(builder, zero16) for _ in range(n_acc)] for _ in range(rows)] if WIDE else None
    k_corr = SCREEN_CORRECTION if mode == "screen" else -128.0  # int8 layouts: the code offset times the group sum

    def unpack(g):
        """The group's 32 weight bytes ``U`` (see the module docstring)."""
        if mode == "int8":
            return builder.xor(_vload(builder, wrow, builder.mul(g, ir.Constant(_I64, GROUP)), _V32B), _bytes(-128, 32))
        half = builder.mul(g, ir.Constant(_I64, GROUP // 2))
        b = _vload(builder, wrow, half, _V16B)  # int4 codes, or the high plane
        if mode == "int4":
            lo, hi = builder.and_(b, _bytes(15)), builder.lshr(b, _bytes(4))
        else:
            lo, hi = builder.shl(b, _bytes(4)), builder.and_(b, _bytes(-16))  # 16 * high nibble
            if mode == "planes":
                low = _vload(builder, row2, half, _V16B)
                lo = builder.or_(lo, builder.and_(low, _bytes(15)))
                hi = builder.or_(hi, builder.lshr(low, _bytes(4)))
        return _concat(builder, lo, hi)

    def unpack_pair(g):
        """Groups ``g`` and ``g + 1``'s 64 weight bytes ``U``, each group's 32 in weight order."""
        if mode == "int8":
            return builder.xor(_vload(builder, wrow, builder.mul(g, ir.Constant(_I64, GROUP)), _V64B), _bytes(-128, 64))
        half = builder.mul(g, ir.Constant(_I64, GROUP // 2))
        b = _vload(builder, wrow, half, _V32B)  # both groups' nibbles (or high planes), 16 bytes each
        if mode == "int4":
            lo, hi = builder.and_(b, _bytes(15, 32)), builder.lshr(b, _bytes(4, 32))
        else:
            lo, hi = builder.shl(b, _bytes(4, 32)), builder.and_(b, _bytes(-16, 32))
            if mode == "planes":
                low = _vload(builder, row2, half, _V32B)
                lo = builder.or_(lo, builder.and_(low, _bytes(15, 32)))
                hi = builder.or_(hi, builder.lshr(low, _bytes(4, 32)))
        # lo/hi hold weights 0-15/16-31 of group g in bytes 0-15, of group g + 1 in bytes 16-31
        order = list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 64), order))

    def add_pair(acc, u, xr, g, factor):
        """``acc += vpdpbusd(U, xq) * factor`` for groups ``g`` and ``g + 1`` (``factor``: their
        scales times xd, 8 lanes each)."""
        sums = _pair_sum(builder, u, _vload(builder, xr, builder.mul(g, ir.Constant(_I64, GROUP)), _V64B))
        builder.store(builder.fadd(builder.load(acc), builder.fmul(sums, factor, flags=_FAST), flags=_FAST), acc)

    def add_group(acc, u, xr, g, factor):
        """``acc += vpdpbusd(U, xq) * factor`` (``factor``: the group's scale times xd, splat)."""
        sums = _group_sum(builder, u, _vload(builder, xr, builder.mul(g, ir.Constant(_I64, GROUP)), _V32B))
        builder.store(builder.fadd(builder.load(acc), builder.fmul(sums, factor, flags=_FAST), flags=_FAST), acc)

    def int4_quad(g, a, factors):
        """Groups ``g .. g + 3`` of an int4 row (the ``a``-th four of their octet) on 512-bit VNNI.
        Their 64 code bytes are used in place: byte lane ``4i .. 4i + 3`` holds weights ``4(i % 4) ..``
        (low nibbles) and ``16 + 4(i % 4) ..`` (high) of group ``g + i // 4``, so the activations are
        shuffled to match (a low and a high half of each group) rather than the weights; both halves
        accumulate into the same lanes, and a 32-bit lane holds a quarter of one group's integer
        sum: one conversion and one multiply-add per 128 weights (pairs of groups in weight order
        took two shuffles of the codes and one of the scales per 64)."""
        b = _vload(builder, wrow, builder.mul(g, ir.Constant(_I64, GROUP // 2)), _V64B)
        lo, hi = builder.and_(b, _bytes(15, 64)), builder.lshr(b, _bytes(4, 64))
        low_half = ir.Constant(ir.VectorType(_I32, 64), [32 * (i // 16) + i % 16 for i in range(64)])
        high_half = ir.Constant(ir.VectorType(_I32, 64), [32 * (i // 16) + 16 + i % 16 for i in range(64)])
        lanes = ir.Constant(ir.VectorType(_I32, 16), [4 * a + i // 4 for i in range(16)])
        at = builder.mul(g, ir.Constant(_I64, GROUP))
        for r, (activations, _) in enumerate(per_row):
            (xr, _), f = activations[0], factors[r][0]
            x0 = _vload(builder, xr, at, _V64B)
            x1 = _vload(builder, xr, builder.add(at, ir.Constant(_I64, 64)), _V64B)
            sums = _dot512(builder, None, lo, builder.shuffle_vector(x0, x1, low_half))
            sums = _dot512(builder, sums, hi, builder.shuffle_vector(x0, x1, high_half))
            acc = wide[r][a % n_acc]
            scaled = builder.fmul(builder.sitofp(sums, _V16F), builder.shuffle_vector(f, f, lanes), flags=_FAST)
            builder.store(builder.fadd(builder.load(acc), scaled, flags=_FAST), acc)

    def octet(o, quads=SUPER // 4):
        """Octet ``o``; with ``quads=1`` (int4 on 512-bit VNNI) its first four groups only, the
        half super-block that ends a row of 128 + 256 k weights (the 270M's 640)."""
        g0 = builder.mul(o, ir.Constant(_I64, SUPER))
        scales, mins = _octet_scales(builder, srow, o, mode)
        factors = []  # per row, per activation part: the octet's scale * xd, <8 x float>
        for r, (activations, srow_x) in enumerate(per_row):
            factors.append([builder.fmul(scales, _vload(builder, dr, g0, _V8F), flags=_FAST) for _, dr in activations])
            xs = _vload(builder, srow_x, g0, _V8F)
            corr = builder.fmul(mins, xs, flags=_FAST) if mode == "int4" else \
                builder.fmul(scales, builder.fmul(xs, _splat(builder, ir.Constant(_F32, k_corr), _V8F), flags=_FAST),
                             flags=_FAST)
            if quads < SUPER // 4:  # the groups past the half are added on their own, if any
                first = ir.Constant(ir.VectorType(ir.IntType(1), 8), [i < 4 * quads for i in range(8)])
                corr = builder.select(first, corr, zero8)
            builder.store(builder.fadd(builder.load(corrs[r]), corr, flags=_FAST), corrs[r])
        if WIDE and mode == "int4":
            for a in range(quads):
                int4_quad(builder.add(g0, ir.Constant(_I64, 4 * a)), a, factors)
            return
        if WIDE:
            for j in range(0, SUPER, 2):
                g = builder.add(g0, ir.Constant(_I64, j))
                u = unpack_pair(g)
                for r, (activations, _) in enumerate(per_row):
                    for (xr, _), f in zip(activations, factors[r]):
                        lanes = builder.shuffle_vector(f, f, ir.Constant(ir.VectorType(_I32, 16), [j] * 8 + [j + 1] * 8))
                        add_pair(wide[r][(j // 2) % n_acc], u, xr, g, lanes)
            return
        for j in range(SUPER):
            g = builder.add(g0, ir.Constant(_I64, j))
            u = unpack(g)
            for r, (activations, _) in enumerate(per_row):
                for (xr, _), f in zip(activations, factors[r]):
                    lane = builder.shuffle_vector(f, f, ir.Constant(ir.VectorType(_I32, 8), [j] * 8))
                    add_group(accs[r][j % n_acc], u, xr, g, lane)

    def single(g):
        """A group past the last whole octet, its scale read alone."""
        if mode == "int4":
            scale, minimum = _super_block_scales(builder, srow, g)
        else:
            scale = _scale_at(builder, srow, g)
        u = unpack(g)
        for r, (activations, srow_x) in enumerate(per_row):
            for xr, dr in activations:
                f = builder.fmul(scale, builder.load(builder.gep(dr, [g])), flags=_FAST)
                add_group(accs[r][0], u, xr, g, _splat(builder, f, _V8F))
            xsum = builder.load(builder.gep(srow_x, [g]))
            corr = builder.fmul(minimum, xsum, flags=_FAST) if mode == "int4" else \
                builder.fmul(scale, builder.fmul(xsum, ir.Constant(_F32, k_corr), flags=_FAST), flags=_FAST)
            first = builder.insert_element(zero8, corr, ir.Constant(_I32, 0))
            builder.store(builder.fadd(builder.load(corrs[r]), first, flags=_FAST), corrs[r])

    def pair(g):
        """Two groups past the last whole octet, their scales read alone (512-bit VNNI)."""
        scales, u = [], unpack_pair(g)
        for i in range(2):
            gi = builder.add(g, ir.Constant(_I64, i))
            scales.append(_super_block_scales(builder, srow, gi) if mode == "int4"
                          else (_scale_at(builder, srow, gi), None))
        halves = ir.Constant(ir.VectorType(_I32, 16), [0] * 8 + [1] * 8)
        for r, (activations, srow_x) in enumerate(per_row):
            for xr, dr in activations:
                f = [builder.fmul(scales[i][0], builder.load(builder.gep(dr, [builder.add(g, ir.Constant(_I64, i))])),
                                  flags=_FAST) for i in range(2)]
                two = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(_F32, 2), ir.Undefined),
                                                                    f[0], ir.Constant(_I32, 0)), f[1], ir.Constant(_I32, 1))
                add_pair(wide[r][0], u, xr, g, builder.shuffle_vector(two, two, halves))
            corr = ir.Constant(_F32, 0.0)
            for i in range(2):
                xsum = builder.load(builder.gep(srow_x, [builder.add(g, ir.Constant(_I64, i))]))
                c = builder.fmul(scales[i][1], xsum, flags=_FAST) if mode == "int4" else \
                    builder.fmul(scales[i][0], builder.fmul(xsum, ir.Constant(_F32, k_corr), flags=_FAST), flags=_FAST)
                corr = builder.fadd(corr, c, flags=_FAST)
            first = builder.insert_element(zero8, corr, ir.Constant(_I32, 0))
            builder.store(builder.fadd(builder.load(corrs[r]), first, flags=_FAST), corrs[r])

    octets = builder.udiv(g_n, ir.Constant(_I64, SUPER))
    with cgutils.for_range(builder, octets) as loop:
        o = loop.index
        g0 = builder.mul(o, ir.Constant(_I64, SUPER))
        # the next rows' bytes, ahead of the hardware prefetcher (which does not run far enough
        # ahead of a loop with this much arithmetic per byte: the screen ran at compute time plus
        # memory time instead of the larger of the two); one prefetch per 64-byte line
        at = builder.add(builder.mul(g0, ir.Constant(_I64, step)), ir.Constant(_I64, PREFETCH))
        for line in range(0, SUPER * step, 64):
            _prefetch(builder, wrow, builder.add(at, ir.Constant(_I64, line)))
            if mode == "planes":
                _prefetch(builder, row2, builder.add(at, ir.Constant(_I64, line)))
        ahead = builder.add(o, ir.Constant(_I64, PREFETCH // (SUPER * step)))  # octets as far ahead as the codes
        if mode == "int4":
            meta = builder.bitcast(srow, _I8.as_pointer())
            _prefetch(builder, meta, builder.mul(ahead, ir.Constant(_I64, META)))
        else:
            _prefetch(builder, srow, builder.mul(ahead, ir.Constant(_I64, SUPER)))
        octet(o)
    done = builder.mul(octets, ir.Constant(_I64, SUPER))
    if WIDE and mode == "int4":
        # four groups left or more: half an octet (the scales of a partial super-block are all
        # stored, the activations' are padded to whole octets); by pairs they cost more than a
        # whole octet (640-wide rows: 46 ns a row against 35 ns at 768)
        half = builder.icmp_unsigned(">=", builder.sub(g_n, done), ir.Constant(_I64, 4))
        with builder.if_then(half):
            octet(octets, quads=1)
        done = builder.select(half, builder.add(done, ir.Constant(_I64, 4)), done)
    if WIDE:  # the rest by pairs, then the last group alone when their number is odd
        pairs = builder.udiv(builder.sub(g_n, done), ir.Constant(_I64, 2))
        with cgutils.for_range(builder, pairs) as loop:
            pair(builder.add(done, builder.mul(loop.index, ir.Constant(_I64, 2))))
        done = builder.add(done, builder.mul(pairs, ir.Constant(_I64, 2)))
    with cgutils.for_range(builder, builder.sub(g_n, done)) as loop:
        single(builder.add(done, loop.index))
    results = []
    for r in range(rows):
        vec = builder.load(accs[r][0])
        for i in range(1, n_acc):
            vec = builder.fadd(vec, builder.load(accs[r][i]), flags=_FAST)
        vec = builder.fadd(vec, builder.load(corrs[r]), flags=_FAST)
        total = _hsum(builder, vec)
        if WIDE:
            vec16 = builder.load(wide[r][0])
            for i in range(1, n_acc):
                vec16 = builder.fadd(vec16, builder.load(wide[r][i]), flags=_FAST)
            total = builder.fadd(total, _hsum(builder, vec16), flags=_FAST)
        results.append(total)
    if rows == 1:
        return results[0]
    return context.make_tuple(builder, sig.return_type, results)


def _check_activations(xa):
    want = {3: (types.int8, types.float32, types.float32),
            6: (types.int8, types.int8, types.float32, types.float32, types.float32, types.float32)}
    if not isinstance(xa, types.BaseTuple) or len(xa) not in want or any(
            not isinstance(t, types.Array) or t.dtype != d for t, d in zip(xa.types, want[len(xa)])):
        raise TypeError(f"expected an activation tuple (xq, xd, xs) or (xq, xq2, xd, xd2, xs, xs1), got {xa}")


def _one_table(mode: str, rows: int = 1):
    """The intrinsic ``dot[rows]_<mode>`` of a layout with one table beside its codes (``int8``: a
    scale per group; ``int4``: the super-blocks' metadata): :func:`_qdot` with that table as both of
    its side arguments, for one activation row (a float32) or ``rows`` of them (a tuple)."""
    ret = types.float32 if rows == 1 else types.UniTuple(types.float32, rows)

    def typer(typingctx, xa, t, codes, table, n):
        _check_activations(xa)
        _check((codes, _WEIGHT), (table, _FLOAT))

        def codegen(context, builder, signature, args):
            xa, t, codes, table, n = args
            a = signature.args
            full = ret(a[0], a[1], a[2], a[3], a[3], a[4])
            return _qdot(context, builder, full, (xa, t, codes, table, table, n), mode, rows=rows)

        return ret(xa, t, codes, table, n), codegen

    typer.__name__ = f"dot{'' if rows == 1 else rows}_{mode}"
    return intrinsic(typer)


dot_int8 = _one_table("int8")
dot_int4 = _one_table("int4")


def _two_planes(mode: str, rows: int = 1):
    """The intrinsic ``dot[rows]_<mode>`` of an int8 row stored as two nibble planes (``planes``:
    exact; ``screen``: the high plane's estimate), for one activation row or ``rows`` of them."""
    ret = types.float32 if rows == 1 else types.UniTuple(types.float32, rows)

    def typer(typingctx, xa, t, high, low, scales, n):
        _check_activations(xa)
        _check((high, _WEIGHT), (low, _WEIGHT), (scales, _SCREEN_SCALES if mode == "screen" else _FLOAT))
        return ret(xa, t, high, low, scales, n), \
            lambda context, builder, sig, args: _qdot(context, builder, sig, args, mode, rows=rows)

    typer.__name__ = f"dot{'' if rows == 1 else rows}_{mode}"
    return intrinsic(typer)


def _multi(rows: int):
    """``dot{rows}_int8``, ``dot{rows}_int4``, ``dot{rows}_planes`` and ``dot{rows}_screen``: the
    one-row products for activation rows ``t .. t + rows - 1`` at once (a ``rows``-tuple; each
    weight group is loaded and unpacked once for all of them)."""
    return _one_table("int8", rows), _one_table("int4", rows), _two_planes("planes", rows), _two_planes("screen", rows)


dot2_int8, dot2_int4, dot2_planes, dot2_screen = _multi(2)
# four rows: the head's full pass only (the products take positions by pairs, see
# cpu_numba.row_all_positions)
dot4_planes = _two_planes("planes", 4)


dot_planes = _two_planes("planes")  # an int8 row stored as two nibble planes, exactly
dot_screen = _two_planes("screen")  # its estimate from the high plane: |error| <= |x| * row_err
# (the screen's scales: fp32, or fp16 bits as uint16 where each is an fp16 value)


@intrinsic
def prefetch_row(typingctx, arr, n):
    """Ask for every cache line of row ``n`` of a C-contiguous 2-D array (a hint: no fault, no
    result). For rows read in an order the hardware prefetcher cannot guess (the head's pass 2)."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        raise TypeError(f"expected a 2-D array, got {arr}")
    sig = types.void(arr, n)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        width = builder.extract_value(a.shape, 1)
        nbytes = builder.mul(width, ir.Constant(_I64, context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))))
        base = builder.bitcast(_row_ptr(builder, a, args[1], width), _I8.as_pointer())
        lines = builder.udiv(builder.add(nbytes, ir.Constant(_I64, 63)), ir.Constant(_I64, 64))
        with cgutils.for_range(builder, lines) as loop:
            _prefetch(builder, base, builder.mul(loop.index, ir.Constant(_I64, 64)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot8(typingctx, arr, n, vec):
    """``sum(arr[n, :8] * vec[:8])`` for fp32 ``arr`` ``[N, 8]`` (C-contiguous) and ``vec``
    ``[8]``: one vector multiply and a horizontal sum (the screened head's exact columns)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.dtype == types.float32
            and isinstance(vec, types.Array) and vec.ndim == 1 and vec.dtype == types.float32):
        raise TypeError(f"expected fp32 arrays [N, 8] and [8], got {arr} and {vec}")
    sig = types.float32(arr, n, vec)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        v = context.make_array(signature.args[2])(context, builder, args[2])
        row = _row_ptr(builder, a, args[1], builder.extract_value(a.shape, 1))
        zero = ir.Constant(_I64, 0)
        prod = builder.fmul(_vload(builder, row, zero, _V8F), _vload(builder, v.data, zero, _V8F), flags=_FAST)
        return _hsum(builder, prod)

    return sig, codegen


def first_part(xa):
    """The one-part activations ``(xq, xd, xs1)`` of a two-part tuple ``(xq, xq2, xd, xd2, xs,
    xs1)`` (the first part's arrays; ``xs1`` its group sums); a one-part tuple as it is. In
    ``@njit`` code."""
    return xa if len(xa) == 3 else (xa[0], xa[2], xa[5])


@overload(first_part, inline="always")
def _first_part(xa):
    _check_activations(xa)
    if len(xa) == 6:
        return lambda xa: (xa[0], xa[2], xa[5])
    return lambda xa: xa
