"""The vector primitives of the CPU kernels, written as LLVM IR through Numba intrinsics.

Numba leaves "add +-v by bit e of a word" scalar (32 compares and selects per word, 4-7x
slower); here a word becomes a <32 x i1> mask of one select over a <32 x float> vector, which
LLVM lowers to the host's vector unit (AVX-512: mask registers). Called only from njit code.
`signed_axpy` keeps the float32 operations of the scalar code in the same order (no fused
multiply-add: the IR asks for none), so it gives the same bits as FORMAT.md's evaluation;
`signed_row_sums` (masked adds) and `nibble_row_sums` (AVX-512 table lookups) are products,
held to 1e-5 of the unpacked matmul, not to its bits.
"""

from __future__ import annotations

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 32  # one 32-bit word of signs
# `nibble_row_sums` needs AVX-512's 16-lane variable permute, in the code Numba compiles for
# this host (a NUMBA_CPU_NAME target other than the host may lack it).
HAS_AVX512 = (numba.config.CPU_NAME in (None, "host")
              and bool(binding.get_host_cpu_features().get("avx512f")))
GROUP_WORDS = 4  # words of a plane row of a full 128-column group
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_MASK = ir.VectorType(ir.IntType(1), LANES)  # bit e of the word is lane e (little-endian)
_I32 = ir.IntType(32)


def _at(context, builder, aryty, ary, index):
    """Pointer to element `index` of a contiguous array."""
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [index])


def _vector_at(builder, ptr, offset):
    return builder.bitcast(builder.gep(ptr, [offset]), _VEC.as_pointer())


def _signs(builder, words_ptr, q):
    return builder.bitcast(builder.load(builder.gep(words_ptr, [q])), _MASK)


def _total(builder, v):
    """Sum of the lanes (pairwise halves)."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n),
                                                      list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _broadcast(builder, value):
    v = builder.insert_element(ir.Constant(_VEC, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def signed_axpy(typingctx, out, o0, b, b0, a, words, u0, nw):
    """out[o0 + 32 q + e] += (bit e of words[u0 + q] ? s : -s), s = a * b[b0 + 32 q + e] (one
    float32 product), for q < nw. out, b float32 and words uint32: 1-D contiguous arrays."""
    sig = types.void(out, o0, b, b0, a, words, u0, nw)

    def codegen(context, builder, signature, args):
        out_v, o0_v, b_v, b0_v, a_v, words_v, u0_v, nw_v = args
        op = _at(context, builder, signature.args[0], out_v, o0_v)
        bp = _at(context, builder, signature.args[2], b_v, b0_v)
        wp = _at(context, builder, signature.args[5], words_v, u0_v)
        av = _broadcast(builder, a_v)
        with cgutils.for_range(builder, nw_v) as loop:
            q = loop.index
            off = builder.mul(q, ir.Constant(q.type, LANES))
            optr = _vector_at(builder, op, off)
            s = builder.fmul(av, builder.load(_vector_at(builder, bp, off), align=4))
            signed = builder.select(_signs(builder, wp, q), s, builder.fneg(s))
            builder.store(builder.fadd(builder.load(optr, align=4), signed), optr, align=4)
        return context.get_dummy_value()

    return sig, codegen


ROWS = 4  # output rows per call of signed_row_sums: each vector of x (.) b loaded serves 4 rows


@intrinsic
def signed_row_sums(typingctx, src, half, planes, row_scale, i0, word, nw, y):
    """y[r] = sum_p a_p[r] sum_{words u of plane p} sum_e (bit e of planes[r, u] ? +1 : -1)
    src[32 u + e] for the ROWS rows r = i0 .. i0 + ROWS - 1 (clamped to the last row: a row past
    it recomputes and rewrites that one), a_p[r] = row_scale[p, r] (float16 bits).

    The signed sum is 2 (sum of src over the set bits) - (sum of src over all bits): each word is
    one masked vector add per row (no negation, no blend), the planes' totals come in as
    half [32 P], half[32 p + e] = (1/2) sum_u src[32 u + e] over plane p's words. Each row's lanes
    start at -half, so they stay half of the signed sum (no large partial sums to cancel when
    x has a mean). src, half float32 and y float32 1-D contiguous; planes uint32 [n, U] and
    row_scale uint16 [P, n] C-contiguous; word, nw int64 [P] (the plane's first word, its count).
    """
    sig = types.void(src, half, planes, row_scale, i0, word, nw, y)

    def codegen(context, builder, signature, args):
        src_v, half_v, planes_v, rs_v, i0_v, word_v, nw_v, y_v = args
        index = i0_v.type
        zero = ir.Constant(_VEC, [0.0] * LANES)
        sp = _at(context, builder, signature.args[0], src_v, ir.Constant(index, 0))
        hp = _at(context, builder, signature.args[1], half_v, ir.Constant(index, 0))
        pl = context.make_array(signature.args[2])(context, builder, planes_v)
        n, n_words = cgutils.unpack_tuple(builder, pl.shape, 2)
        last = builder.sub(n, ir.Constant(index, 1))
        rows = []
        for r in range(ROWS):
            i = builder.add(i0_v, ir.Constant(index, r))
            rows.append(builder.select(builder.icmp_signed("<", i, n), i, last))
        words = [builder.gep(pl.data, [builder.mul(i, n_words)]) for i in rows]
        rs = context.make_array(signature.args[3])(context, builder, rs_v)
        n_cols = cgutils.unpack_tuple(builder, rs.shape, 2)[1]
        word_a = context.make_array(signature.args[5])(context, builder, word_v)
        nw_a = context.make_array(signature.args[6])(context, builder, nw_v)
        yp = _at(context, builder, signature.args[7], y_v, ir.Constant(index, 0))
        n_planes = cgutils.unpack_tuple(builder, word_a.shape, 1)[0]
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(ROWS)]
        part = [cgutils.alloca_once_value(builder, zero) for _ in range(ROWS)]

        def add_word(u):
            v = builder.load(_vector_at(builder, sp, builder.mul(u, ir.Constant(index, LANES))),
                             align=4)
            for r in range(ROWS):
                old = builder.load(part[r])
                builder.store(builder.select(_signs(builder, words[r], u), builder.fadd(old, v),
                                             old), part[r])

        with cgutils.for_range(builder, n_planes) as lp:
            p = lp.index
            u0 = builder.load(builder.gep(word_a.data, [p]))
            count = builder.load(builder.gep(nw_a.data, [p]))
            minus_half = builder.fneg(builder.load(
                _vector_at(builder, hp, builder.mul(p, ir.Constant(index, LANES))), align=4))
            for r in range(ROWS):
                builder.store(minus_half, part[r])
            full = builder.icmp_signed("==", count, ir.Constant(count.type, GROUP_WORDS))
            with builder.if_else(full, likely=True) as (group, narrow):
                with group:  # every group but the last: straight-line code
                    for q in range(GROUP_WORDS):
                        add_word(builder.add(u0, ir.Constant(index, q)))
                with narrow, cgutils.for_range(builder, count) as lq:
                    add_word(builder.add(u0, lq.index))
            for r in range(ROWS):
                h = builder.load(builder.gep(rs.data, [builder.add(builder.mul(p, n_cols),
                                                                   rows[r])]))
                a = builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)  # exact
                builder.store(builder.fadd(builder.load(acc[r]), builder.fmul(
                    _broadcast(builder, a), builder.load(part[r]))), acc[r])
        two = ir.Constant(_F32, 2.0)
        for r in range(ROWS):
            builder.store(builder.fmul(two, _total(builder, builder.load(acc[r]))),
                          builder.gep(yp, [rows[r]]))
        return context.get_dummy_value()

    return sig, codegen


VECTOR_ROWS = 16  # rows in the lanes of one AVX-512 vector of float32
TABLE_ROWS = 32  # output rows per call of nibble_row_sums: two vectors share each table load
NIBBLES = LANES // 4  # 4-sign nibbles per word
_VF16 = ir.VectorType(_F32, VECTOR_ROWS)
_VI16 = ir.VectorType(_I32, VECTOR_ROWS)


def _permute(builder, table, index):
    """[16] float32: table[index[r] mod 16] for each lane r (vpermps)."""
    fnty = ir.FunctionType(_VF16, [_VF16, _VI16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, index])


def _prefetch(builder, ptr):
    """Ask for ptr's cache line in L2 (prefetcht1); it never faults, past the array too."""
    i8p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p)] + [ir.Constant(_I32, v) for v in (0, 2, 1)])


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


# Within each 128-bit block l of two vectors a, b (x86's unpack instructions, one uop each)
_LO32 = [i for k in range(0, 16, 4) for i in (k, 16 + k, k + 1, 17 + k)]
_HI32 = [i for k in range(0, 16, 4) for i in (k + 2, 18 + k, k + 3, 19 + k)]
_LO64 = [i for k in range(0, 16, 4) for i in (k, k + 1, 16 + k, 17 + k)]
_HI64 = [i for k in range(0, 16, 4) for i in (k + 2, k + 3, 18 + k, 19 + k)]


def _row_words(builder, rows, u0):
    """The 4 words u0 .. u0 + 3 of each of 16 rows (pointers `rows`) as 4 vectors, lane r of
    vector q = word u0 + q of row r. Vector A_k gathers rows k, 4 + k, 8 + k, 12 + k (a load
    of 4 words each, one per 128-bit block); the 4 x 4 transposition within every block (8
    unpacks) then leaves the rows in order."""
    v4 = ir.VectorType(_I32, 4)
    A = []
    for k in range(4):
        quads = [builder.load(builder.bitcast(builder.gep(rows[4 * l + k], [u0]),
                                              v4.as_pointer()), align=4) for l in range(4)]
        A.append(_shuffle(builder, _shuffle(builder, quads[0], quads[1], list(range(8))),
                          _shuffle(builder, quads[2], quads[3], list(range(8))),
                          list(range(16))))
    t0, t1 = _shuffle(builder, A[0], A[1], _LO32), _shuffle(builder, A[0], A[1], _HI32)
    t2, t3 = _shuffle(builder, A[2], A[3], _LO32), _shuffle(builder, A[2], A[3], _HI32)
    return [_shuffle(builder, t0, t2, _LO64), _shuffle(builder, t0, t2, _HI64),
            _shuffle(builder, t1, t3, _LO64), _shuffle(builder, t1, t3, _HI64)]


def _nibble_row_sums(vectors: int):
    """`nibble_row_sums` for 16 `vectors` rows a call."""
    n_rows = VECTOR_ROWS * vectors

    @intrinsic
    def kernel(typingctx, table, planes, row_scale, i0, word, nw, y):
        sig = types.void(table, planes, row_scale, i0, word, nw, y)

        def codegen(context, builder, signature, args):
            tab_v, planes_v, rs_v, i0_v, word_v, nw_v, y_v = args
            index = i0_v.type
            tp = _at(context, builder, signature.args[0], tab_v, ir.Constant(index, 0))
            pl = context.make_array(signature.args[1])(context, builder, planes_v)
            n_words = cgutils.unpack_tuple(builder, pl.shape, 2)[1]
            block = builder.gep(pl.data, [builder.mul(i0_v, n_words)])
            rows = [builder.gep(block, [builder.mul(ir.Constant(index, r), n_words)])
                    for r in range(n_rows)]
            following = builder.gep(rows[-1], [n_words])  # the next call's rows, contiguous
            rs = context.make_array(signature.args[2])(context, builder, rs_v)
            n_cols = cgutils.unpack_tuple(builder, rs.shape, 2)[1]
            word_a = context.make_array(signature.args[4])(context, builder, word_v)
            nw_a = context.make_array(signature.args[5])(context, builder, nw_v)
            yp = _at(context, builder, signature.args[6], y_v, i0_v)
            n_planes = cgutils.unpack_tuple(builder, word_a.shape, 1)[0]
            # -0 is the additive identity LLVM may drop (x + 0 is not x for x = -0)
            zero = ir.Constant(_VF16, [-0.0] * VECTOR_ROWS)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(vectors)]
            part = [cgutils.alloca_once_value(builder, zero) for _ in range(vectors)]

            def lookups(ws, u):
                """part[v] += the 8 lookups of word u of vector v's rows (words ws[v])."""
                base = builder.mul(u, ir.Constant(index, 16 * NIBBLES))
                tabs = [builder.load(builder.bitcast(builder.gep(tp, [builder.add(
                    base, ir.Constant(index, 16 * j))]), _VF16.as_pointer()), align=4)
                    for j in range(NIBBLES)]
                for v, w in enumerate(ws):  # vpermps reads the low 4 bits of each index
                    s = [_permute(builder, tabs[j], builder.lshr(
                        w, ir.Constant(_VI16, [4 * j] * VECTOR_ROWS)) if j else w)
                        for j in range(NIBBLES)]
                    while len(s) > 1:  # a fixed tree
                        s = [builder.fadd(s[2 * k], s[2 * k + 1]) for k in range(len(s) // 2)]
                    builder.store(builder.fadd(builder.load(part[v]), s[0]), part[v])

            with cgutils.for_range(builder, n_planes) as lp:
                p = lp.index
                u0 = builder.load(builder.gep(word_a.data, [p]))
                count = builder.load(builder.gep(nw_a.data, [p]))
                for pt in part:
                    builder.store(zero, pt)
                full = builder.icmp_signed("==", count, ir.Constant(count.type, GROUP_WORDS))
                with builder.if_else(full, likely=True) as (group, narrow):
                    with group:
                        # The rows of the next call stream into L2 meanwhile: as many bytes
                        # of them as these 4 words of n_rows rows (the hardware prefetcher
                        # follows n_rows rows a page apart poorly).
                        ahead = builder.mul(u0, ir.Constant(index, n_rows))
                        for k in range(n_rows // 4):  # 16 n_rows bytes, lines of 64
                            _prefetch(builder, builder.gep(following, [
                                builder.add(ahead, ir.Constant(index, 16 * k))]))
                        words = [_row_words(builder, rows[VECTOR_ROWS * v:VECTOR_ROWS * (v + 1)],
                                            u0) for v in range(vectors)]
                        for q in range(GROUP_WORDS):
                            lookups([w[q] for w in words],
                                    builder.add(u0, ir.Constant(index, q)))
                    with narrow, cgutils.for_range(builder, count) as lq:  # a narrow last group
                        u = builder.add(u0, lq.index)
                        ws = []
                        for v in range(vectors):
                            w = ir.Constant(_VI16, None)
                            for r in range(VECTOR_ROWS):
                                w = builder.insert_element(w, builder.load(builder.gep(
                                    rows[VECTOR_ROWS * v + r], [u])), ir.Constant(_I32, r))
                            ws.append(w)
                        lookups(ws, u)
                for v in range(vectors):
                    hp = builder.gep(rs.data, [builder.add(builder.mul(p, n_cols), builder.add(
                        i0_v, ir.Constant(index, VECTOR_ROWS * v)))])
                    a = builder.fpext(builder.load(builder.bitcast(
                        hp, ir.VectorType(ir.HalfType(), VECTOR_ROWS).as_pointer()), align=2),
                        _VF16)
                    builder.store(builder.fadd(builder.load(acc[v]),
                                               builder.fmul(a, builder.load(part[v]))), acc[v])
            for v in range(vectors):
                builder.store(builder.load(acc[v]), builder.bitcast(builder.gep(
                    yp, [ir.Constant(index, VECTOR_ROWS * v)]), _VF16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    kernel.__doc__ = f"""y[i0 + r] = sum_p a_p[r] sum_{{words u of plane p}} sum_{{j < 8}}
    table[128 u + 16 j + (nibble j of planes[i0 + r, u])] for the {n_rows} rows r < {n_rows}
    (all of them rows of planes: the caller keeps i0 + {n_rows} <= n), a_p[r] =
    row_scale[p, i0 + r] (float16 bits). table[128 u + 16 j + c] is the signed sum of inputs
    4 j .. 4 j + 3 of word u under the 4 signs of c (`qdtk.math.bcq_matmul.nibble_tables`).

    T-MAC style: 16 rows are the 16 lanes of one vector, so a word of 32 signs of 16 rows costs
    8 table lookups (vpermps: the 16 entries of a nibble's table are one vector, the rows'
    nibbles its indices), 7 shifts and 8 adds, and a plane's row scales are one vector multiply;
    no sums across lanes. {vectors} vector(s) of rows share each table load. AVX-512 only
    (HAS_AVX512). table, y float32 1-D contiguous; planes uint32 [n, U] and row_scale uint16
    [P, n] C-contiguous; word, nw int64 [P].
    """
    return kernel


nibble_row_sums = _nibble_row_sums(TABLE_ROWS // VECTOR_ROWS)
nibble_row_sums_16 = _nibble_row_sums(1)  # the last n mod 32 rows, 16 of them when there are
