// max-pool 2x2 / stride 2 / no padding in AVX-512F: 16 output columns per step, ceil_mode's
// partial last row and column of windows included. H/W input, P/Q output. Built with
// -mavx512f for this file only; pool2d.cpp calls it when the CPU has AVX-512F. Nothing here
// may be an inline function shared with other files (a copy compiled for AVX-512 could be
// picked by the linker for callers on older CPUs), so the helpers live in an anonymous
// namespace and no standard-library templates are used.
#include "pool2d_simd.hpp"

#if defined(CNNBP_AVX512_KERNELS)

#include <immintrin.h>

// GCC 12's AVX-512 headers start some conversions from a deliberately undefined vector,
// which -Wmaybe-uninitialized (or -Wuninitialized, at -O1) reports once inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace cnnbp::detail {
namespace {

// Lane masks of one step of a row of windows: n <= 16 windows, whose cells lie in input
// columns 2q .. 2q + 2n - 1 of their row pair, `columns` of them inside the input (2n - 1
// when the last is ceil_mode's window of the last column, clipped to it).
struct StepMasks {
    __mmask16 out;    // outputs (and doutput) 0..n-1
    __mmask8 out_lo;  // the same for the first 8 int64 indices
    __mmask8 out_hi;  // and the next 8
    __mmask16 in_lo;  // input columns 2q .. 2q+15 inside the input
    __mmask16 in_hi;  // input columns 2q+16 .. 2q+31 inside the input
    __mmask16 right;  // windows with a right column: all but ceil_mode's last when W is odd
};

// The masks of the step from window column q of a row of Q windows over W input columns.
StepMasks step_masks(int64_t q, int64_t W, int64_t Q) {
    const int64_t n = Q - q < 16 ? Q - q : 16, columns = W - 2 * q < 2 * n ? W - 2 * q : 2 * n,
                  whole = W / 2 - q;
    auto low_bits = [](int64_t k) -> unsigned {  // k in [0, 16]
        return k >= 16 ? 0xFFFFu : (1u << k) - 1u;
    };
    StepMasks m;
    m.out = static_cast<__mmask16>(low_bits(n));
    m.out_lo = static_cast<__mmask8>(m.out & 0xFF);
    m.out_hi = static_cast<__mmask8>(m.out >> 8);
    m.in_lo = static_cast<__mmask16>(low_bits(columns));
    m.in_hi = static_cast<__mmask16>(low_bits(columns > 16 ? columns - 16 : 0));
    m.right = static_cast<__mmask16>(low_bits(whole));
    return m;
}

// Whether a row of windows has its lower input row (a compile-time tag: all rows but
// ceil_mode's last one when H is odd).
template <bool kLower>
struct LowerRow {
    static constexpr bool value = kLower;
};

// The forward's test `value > best || isnan(value)`, lane by lane.
inline __mmask16 takes(__m512 value, __m512 best) {
    return _mm512_cmp_ps_mask(value, best, _CMP_GT_OQ) |
           _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
}

// 16 windows' choice: the best cell and its offset from the window's first cell (1, W or
// W + 1 as given, else 0).
struct Choice {
    __m512 best;
    __m512i offset;
};

// The window's cells in row-major order, as the general kernel visits them: the first cell
// (always inside) is always taken (a -inf first cell keeps best = -inf and its own index, as
// in the general kernel); later cells by `>` or NaN, the last taken winning.
inline Choice choose(__m512 top_left, __m512 top_right, __m512 bottom_left, __m512 bottom_right,
                     __m512i off_right, __m512i off_below, __m512i off_below_right) {
    __m512 best = top_left;
    const __mmask16 t1 = takes(top_right, best);
    best = _mm512_mask_mov_ps(best, t1, top_right);
    const __mmask16 t2 = takes(bottom_left, best);
    best = _mm512_mask_mov_ps(best, t2, bottom_left);
    const __mmask16 t3 = takes(bottom_right, best);
    best = _mm512_mask_mov_ps(best, t3, bottom_right);
    __m512i offset = _mm512_maskz_mov_epi32(t1, off_right);
    offset = _mm512_mask_mov_epi32(offset, t2, off_below);
    offset = _mm512_mask_mov_epi32(offset, t3, off_below_right);
    return {best, offset};
}

}  // namespace

void max_pool2x2_plane_avx512(float* output, int64_t* indices, const float* input, int64_t H,
                              int64_t W, int64_t P, int64_t Q) {
    // Even and odd columns of 32 consecutive inputs: the left and right cells of 16 windows.
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i column2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);  // 2 * lane
    const __m512i sixteen = _mm512_set1_epi64(16);
    const __m512i off_right = _mm512_set1_epi32(1),
                  off_below = _mm512_set1_epi32(static_cast<int>(W)),
                  off_below_right = _mm512_set1_epi32(static_cast<int>(W + 1));
    // Cells outside the input (right of ceil_mode's last column of windows when W is odd,
    // below its last row when H is odd) read as -inf, which `takes` never takes: the same
    // choice as visiting only the cells inside, as the general kernel does. (Whole steps
    // have no such cells.)
    const __m512 outside = _mm512_set1_ps(-__builtin_inff());
    // Every step of a row holds 16 windows that lie inside the input but the last, whose
    // masks are the same in every row.
    const int64_t q_last = (Q - 1) / 16 * 16;
    const StepMasks whole = step_masks(0, 32, 16), last = step_masks(q_last, W, Q);
    auto row = [&](int64_t p, auto lower) {
        const float* row0 = input + 2 * p * W;
        const float* row1 = row0 + W;  // read only with a lower row
        float* out = output + p * Q;
        int64_t* idx = indices + p * Q;
        auto step = [&](int64_t q, const StepMasks& m, __m512 fill) {
            const __m512 a0 = _mm512_mask_loadu_ps(fill, m.in_lo, row0 + 2 * q);
            const __m512 a1 = _mm512_mask_loadu_ps(fill, m.in_hi, row0 + 2 * q + 16);
            __m512 b0 = outside, b1 = outside;
            if constexpr (decltype(lower)::value) {
                b0 = _mm512_mask_loadu_ps(fill, m.in_lo, row1 + 2 * q);
                b1 = _mm512_mask_loadu_ps(fill, m.in_hi, row1 + 2 * q + 16);
            }
            const Choice choice =
                choose(_mm512_permutex2var_ps(a0, even, a1), _mm512_permutex2var_ps(a0, odd, a1),
                       _mm512_permutex2var_ps(b0, even, b1), _mm512_permutex2var_ps(b0, odd, b1),
                       off_right, off_below, off_below_right);
            _mm512_mask_storeu_ps(out + q, m.out, choice.best);
            // index = 2p*W + 2(q + lane) + offset of the chosen cell; offsets in 32 bits
            // (W < 2^30, checked by the caller), widened for the sum
            const __m512i offset = choice.offset;
            const __m512i first_lo =
                _mm512_add_epi64(_mm512_set1_epi64(2 * p * W + 2 * q), column2);
            const __m512i first_hi = _mm512_add_epi64(first_lo, sixteen);
            const __m512i idx_lo =
                _mm512_add_epi64(first_lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(offset)));
            const __m512i idx_hi = _mm512_add_epi64(
                first_hi, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(offset, 1)));
            _mm512_mask_storeu_epi64(idx + q, m.out_lo, idx_lo);
            _mm512_mask_storeu_epi64(idx + q + 8, m.out_hi, idx_hi);
        };
        for (int64_t q = 0; q < q_last; q += 16) step(q, whole, _mm512_setzero_ps());
        step(q_last, last, outside);  // in a separate call: faster than masks chosen per step
    };
    const int64_t P0 = H / 2;  // rows of windows with both input rows
    for (int64_t p = 0; p < P0; ++p) row(p, LowerRow<true>{});
    if (P > P0) row(P0, LowerRow<false>{});
}

bool max_unpool2x2_plane_avx512(float* dinput, const float* doutput, const int64_t* indices,
                                int64_t H, int64_t W, int64_t P, int64_t Q) {
    // Interleave 16 left-cell and 16 right-cell values back into 32 consecutive columns.
    const __m512i mix_lo =
        _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i mix_hi =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i column2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i sixteen = _mm512_set1_epi64(16);
    const __m512i off_right = _mm512_set1_epi32(1),
                  off_below = _mm512_set1_epi32(static_cast<int>(W)),
                  off_below_right = _mm512_set1_epi32(static_cast<int>(W + 1));
    const __m512 zero = _mm512_setzero_ps();
    // The right cells (offsets 1 and W + 1) of ceil_mode's last window of a row lie outside
    // the input when W is odd (offset 1 is the next row's first cell): m.right leaves them
    // out. A row of windows without its lower input row has no offsets W and W + 1.
    const int64_t q_last = (Q - 1) / 16 * 16;
    const StepMasks whole = step_masks(0, 32, 16), last = step_masks(q_last, W, Q);
    auto row = [&](int64_t p, auto lower) {
        float* row0 = dinput + 2 * p * W;
        float* row1 = row0 + W;  // written only with a lower row
        const float* dout = doutput + p * Q;
        const int64_t* idx = indices + p * Q;
        auto step = [&](int64_t q, const StepMasks& m) {
            // 0 + dy, not dy: the zero-filled cell plus the gradient, so that -0 becomes +0
            // exactly as in the scatter this replaces.
            const __m512 g = _mm512_add_ps(zero, _mm512_maskz_loadu_ps(m.out, dout + q));
            const __m512i first_lo =
                _mm512_add_epi64(_mm512_set1_epi64(2 * p * W + 2 * q), column2);
            const __m512i first_hi = _mm512_add_epi64(first_lo, sixteen);
            // Offsets of the indices from their windows' first cells, narrowed with
            // saturation to 32 bits: a far-off index stays far off (W + 1 < 2^31).
            const __m512i off_lo =
                _mm512_sub_epi64(_mm512_maskz_loadu_epi64(m.out_lo, idx + q), first_lo);
            const __m512i off_hi =
                _mm512_sub_epi64(_mm512_maskz_loadu_epi64(m.out_hi, idx + q + 8), first_hi);
            const __m512i offset =
                _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi64_epi32(off_lo)),
                                   _mm512_cvtsepi64_epi32(off_hi), 1);
            const __mmask16 k0 = _mm512_testn_epi32_mask(offset, offset),
                            k1 = _mm512_cmpeq_epi32_mask(offset, off_right) & m.right;
            __mmask16 k2 = 0, k3 = 0;
            if constexpr (decltype(lower)::value) {
                k2 = _mm512_cmpeq_epi32_mask(offset, off_below);
                k3 = _mm512_cmpeq_epi32_mask(offset, off_below_right) & m.right;
            }
            // Each index must name a cell of its own window inside the input.
            if (static_cast<__mmask16>((k0 | k1 | k2 | k3) & m.out) != m.out) return false;
            const __m512 top_left = _mm512_maskz_mov_ps(k0, g),
                         top_right = _mm512_maskz_mov_ps(k1, g);
            _mm512_mask_storeu_ps(row0 + 2 * q, m.in_lo,
                                  _mm512_permutex2var_ps(top_left, mix_lo, top_right));
            _mm512_mask_storeu_ps(row0 + 2 * q + 16, m.in_hi,
                                  _mm512_permutex2var_ps(top_left, mix_hi, top_right));
            if constexpr (decltype(lower)::value) {
                const __m512 bottom_left = _mm512_maskz_mov_ps(k2, g),
                             bottom_right = _mm512_maskz_mov_ps(k3, g);
                _mm512_mask_storeu_ps(row1 + 2 * q, m.in_lo,
                                      _mm512_permutex2var_ps(bottom_left, mix_lo, bottom_right));
                _mm512_mask_storeu_ps(row1 + 2 * q + 16, m.in_hi,
                                      _mm512_permutex2var_ps(bottom_left, mix_hi, bottom_right));
            }
            return true;
        };
        for (int64_t q = 0; q < q_last; q += 16)
            if (!step(q, whole)) return false;
        if (!step(q_last, last)) return false;
        if (W > 2 * Q) {  // odd width, floored: a column no window sees
            row0[W - 1] = 0.0f;
            if constexpr (decltype(lower)::value) row1[W - 1] = 0.0f;
        }
        return true;
    };
    const int64_t P0 = H / 2;  // rows of windows with both input rows
    for (int64_t p = 0; p < P0; ++p)
        if (!row(p, LowerRow<true>{})) return false;
    if (P > P0) {
        if (!row(P0, LowerRow<false>{})) return false;
    } else if (H > 2 * P) {  // odd height, floored: a row no window sees
        for (int64_t w = 0; w < W; ++w) dinput[(H - 1) * W + w] = 0.0f;
    }
    return true;
}

namespace {

// A chunk's 16 windows: window j lies in row pair j / Q, column pair j % Q of the chunk's 64
// inputs (W = 2Q values a row). Its first cell, `at`, lies among the first 32 inputs for
// j < 8 and among the last 32 for j >= 8, so one two-source permute of each half gathers a
// cell of all 16 windows.
struct ChunkLayout {
    __m512i first;     // at, less 32 for j >= 8: the permute index of the top-left cells
    __m512i plane_lo;  // at - (j / PQ) * HW for j < 8: the window's first cell in its plane,
    __m512i plane_hi;  // less the chunk's base; and for j >= 8
};

ChunkLayout chunk_layout(int64_t H, int64_t W) {
    const int64_t Q = W / 2, PQ = H / 2 * Q, HW = H * W;
    alignas(64) int32_t first[16];
    alignas(64) int64_t in_plane[16];
    for (int64_t j = 0; j < 16; ++j) {
        const int64_t at = j / Q * 2 * W + j % Q * 2;
        first[j] = static_cast<int32_t>(j < 8 ? at : at - 32);
        in_plane[j] = at - j / PQ * HW;  // PQ >= 16: every window in the chunk's plane
    }
    return {_mm512_load_si512(first), _mm512_load_si512(in_plane), _mm512_load_si512(in_plane + 8)};
}

// The chunk's base: chunk c's window j has its first cell at base + in_plane[j] of its plane
// (its inputs start at 64c, in plane 16c / PQ).
inline int64_t chunk_base(int64_t c, int64_t PQ, int64_t HW) { return 64 * c - 16 * c / PQ * HW; }

}  // namespace

void max_pool2x2_chunks_avx512(float* output, int64_t* indices, const float* input, int64_t H,
                               int64_t W, int64_t chunk_begin, int64_t chunk_end) {
    const int64_t PQ = H / 2 * (W / 2), HW = H * W;
    const ChunkLayout layout = chunk_layout(H, W);
    const __m512i one = _mm512_set1_epi32(1), below = _mm512_set1_epi32(static_cast<int>(W));
    const __m512i top_left_at = layout.first, top_right_at = _mm512_add_epi32(top_left_at, one),
                  bottom_left_at = _mm512_add_epi32(top_left_at, below),
                  bottom_right_at = _mm512_add_epi32(bottom_left_at, one);
    const __m512i off_right = one, off_below = below,
                  off_below_right = _mm512_add_epi32(below, one);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const float* in = input + 64 * c;
        const __m512 z0 = _mm512_loadu_ps(in), z1 = _mm512_loadu_ps(in + 16),
                     z2 = _mm512_loadu_ps(in + 32), z3 = _mm512_loadu_ps(in + 48);
        // windows 0..7 from z0, z1 and 8..15 from z2, z3
        auto cell = [&](__m512i at) {
            return _mm512_mask_blend_ps(0xFF00, _mm512_permutex2var_ps(z0, at, z1),
                                        _mm512_permutex2var_ps(z2, at, z3));
        };
        const Choice choice = choose(cell(top_left_at), cell(top_right_at), cell(bottom_left_at),
                                     cell(bottom_right_at), off_right, off_below, off_below_right);
        _mm512_storeu_ps(output + 16 * c, choice.best);
        const __m512i offset = choice.offset;
        const __m512i base = _mm512_set1_epi64(chunk_base(c, PQ, HW));
        const __m512i idx_lo =
            _mm512_add_epi64(_mm512_add_epi64(base, layout.plane_lo),
                             _mm512_cvtepi32_epi64(_mm512_castsi512_si256(offset)));
        const __m512i idx_hi =
            _mm512_add_epi64(_mm512_add_epi64(base, layout.plane_hi),
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(offset, 1)));
        _mm512_storeu_si512(indices + 16 * c, idx_lo);
        _mm512_storeu_si512(indices + 16 * c + 8, idx_hi);
    }
}

bool max_unpool2x2_chunks_avx512(float* dinput, const float* doutput, const int64_t* indices,
                                 int64_t H, int64_t W, int64_t chunk_begin, int64_t chunk_end) {
    const int64_t Q = W / 2, PQ = H / 2 * Q, HW = H * W;
    const ChunkLayout layout = chunk_layout(H, W);
    // Input t of a chunk (t < 64) lies in row pair t / 2W, row (t % 2W) / W of it, column
    // t % W: window j = (t / 2W) * Q + (t % W) / 2, its left or right cell by t % 2. Output
    // vector v (inputs 16v .. 16v+15) takes lane j + 16 * (t % 2) of (top-left, top-right)
    // or of (bottom-left, bottom-right), the latter where `lower` has t's bit.
    alignas(64) int32_t source[4][16];
    __mmask16 lower[4] = {0, 0, 0, 0};
    for (int64_t t = 0; t < 64; ++t) {
        const int64_t v = t / 16, u = t % 16;
        source[v][u] = static_cast<int32_t>((t / (2 * W)) * Q + (t % W) / 2 + 16 * (t % 2));
        if ((t % (2 * W)) / W) lower[v] = static_cast<__mmask16>(lower[v] | (1u << u));
    }
    const __m512i off_right = _mm512_set1_epi32(1), off_below = _mm512_set1_epi32(int(W)),
                  off_below_right = _mm512_set1_epi32(int(W + 1));
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        // 0 + dy, not dy: the zero-filled cell plus the gradient, so that -0 becomes +0
        // exactly as in the scatter this replaces.
        const __m512 g = _mm512_add_ps(zero, _mm512_loadu_ps(doutput + 16 * c));
        const __m512i base = _mm512_set1_epi64(chunk_base(c, PQ, HW));
        // offsets of the indices from their windows' first cells, narrowed with saturation
        const __m512i off_lo = _mm512_sub_epi64(_mm512_loadu_si512(indices + 16 * c),
                                                _mm512_add_epi64(base, layout.plane_lo));
        const __m512i off_hi = _mm512_sub_epi64(_mm512_loadu_si512(indices + 16 * c + 8),
                                                _mm512_add_epi64(base, layout.plane_hi));
        const __m512i offset =
            _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi64_epi32(off_lo)),
                               _mm512_cvtsepi64_epi32(off_hi), 1);
        const __mmask16 k0 = _mm512_testn_epi32_mask(offset, offset),
                        k1 = _mm512_cmpeq_epi32_mask(offset, off_right),
                        k2 = _mm512_cmpeq_epi32_mask(offset, off_below),
                        k3 = _mm512_cmpeq_epi32_mask(offset, off_below_right);
        // each index must name a cell of its own window
        if (static_cast<__mmask16>(k0 | k1 | k2 | k3) != 0xFFFF) return false;
        const __m512 top_left = _mm512_maskz_mov_ps(k0, g), top_right = _mm512_maskz_mov_ps(k1, g),
                     bottom_left = _mm512_maskz_mov_ps(k2, g),
                     bottom_right = _mm512_maskz_mov_ps(k3, g);
        float* din = dinput + 64 * c;
        for (int v = 0; v < 4; ++v) {
            const __m512i at = _mm512_load_si512(source[v]);
            _mm512_storeu_ps(
                din + 16 * v,
                _mm512_mask_blend_ps(lower[v], _mm512_permutex2var_ps(top_left, at, top_right),
                                     _mm512_permutex2var_ps(bottom_left, at, bottom_right)));
        }
    }
    return true;
}

}  // namespace cnnbp::detail

#endif  // CNNBP_AVX512_KERNELS
