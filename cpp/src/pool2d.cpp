// max_pool2d and avg_pool2d, forward and backward. N batch, C channels, H/W input, P/Q
// output.
//
// Every (n, c) plane is independent, so the planes are shared among threads and each plane's
// result is computed by one thread in one fixed order: results do not depend on the thread
// count. The common 2x2 / stride 2 / no padding pool has a kernel of its own (AVX-512 when the
// CPU has it, else portable loops), ceil_mode's partial windows included, that visits the
// window cells in the same order with the same comparisons as the general kernel, so the two
// agree bit for bit. Its AVX-512 backward writes a plane in one pass; without AVX-512, zero-fill
// and scatter is faster than one-pass loops and does it.
#include "cnnbp/pool2d.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.hpp"
#include "parallel.hpp"
#include "pool2d_simd.hpp"

namespace cnnbp {
namespace {

// The forward's choice rule, shared by every kernel: strict > keeps the first of equal
// values (row-major window order), and a NaN is always taken, so the last NaN wins.
template <typename T>
inline bool takes(T value, T best) {
    return value > best || std::isnan(value);
}

// The window of output (op, oq): its taps (h0 + i * dilation_h, w0 + j * dilation_w) inside
// the plane, padding is -inf and never wins. As torch: the window ends at start + (kernel -
// 1) * dilation + 1 clipped to the plane, the start steps by dilation until it is inside.
template <typename T>
inline void max_pool_window(T* out, int64_t* idx, const T* in, const Pool2dDims& d, int64_t op,
                            int64_t oq) {
    const auto& p = d.params;
    const int64_t h_start = op * p.stride_h - p.pad_h, w_start = oq * p.stride_w - p.pad_w;
    const int64_t h1 = std::min(h_start + (p.kernel_h - 1) * p.dilation_h + 1, d.H);
    const int64_t w1 = std::min(w_start + (p.kernel_w - 1) * p.dilation_w + 1, d.W);
    // the first tap at or after 0 (pool2d_dims checked that it lies inside the plane)
    const int64_t h0 = h_start >= 0
                           ? h_start
                           : h_start + (-h_start + p.dilation_h - 1) / p.dilation_h * p.dilation_h;
    const int64_t w0 = w_start >= 0
                           ? w_start
                           : w_start + (-w_start + p.dilation_w - 1) / p.dilation_w * p.dilation_w;
    // An all -inf window reports its first in-bounds cell.
    int64_t best_index = h0 * d.W + w0;
    T best = -std::numeric_limits<T>::infinity();
    for (int64_t h = h0; h < h1; h += p.dilation_h)
        for (int64_t w = w0; w < w1; w += p.dilation_w) {
            const T value = in[h * d.W + w];
            if (takes(value, best)) {
                best = value;
                best_index = h * d.W + w;
            }
        }
    out[op * d.Q + oq] = best;
    idx[op * d.Q + oq] = best_index;
}

// Any window size, stride, padding, dilation and rounding of the output size.
template <typename T>
void max_pool_plane(T* out, int64_t* idx, const T* in, const Pool2dDims& d) {
    for (int64_t op = 0; op < d.P; ++op)
        for (int64_t oq = 0; oq < d.Q; ++oq) max_pool_window(out, idx, in, d, op, oq);
}

}  // namespace

namespace detail {

// The portable 2x2 kernels work on runs of up to kRun outputs of one row, in loops that
// the compiler vectorizes for the baseline instruction set: window offsets are kept in
// 32 bits (W < kMaxSimdWidth, checked by the callers), since loops that mix float
// selects with 64-bit integers stay scalar, and the pointers are restrict.
constexpr int64_t kRun = 256;

// One run of 2x2 windows: best value and the offset of its cell from the window's first
// cell. The first cell is always taken (value > -inf, or NaN; a -inf first cell leaves best
// = -inf at its own index), then the other three in row-major order by the rule of takes(),
// written with | so that there is no branch.
template <typename T>
void pool2x2_run(T* __restrict out, int32_t* __restrict offset, const T* __restrict row0,
                 const T* __restrict row1, int64_t n, int32_t W) {
    for (int64_t q = 0; q < n; ++q) {
        const T c1 = row0[2 * q + 1], c2 = row1[2 * q], c3 = row1[2 * q + 1];
        T best = row0[2 * q];
        int32_t at = 0;
        bool t = (c1 > best) | (c1 != c1);
        best = t ? c1 : best;
        at = t ? 1 : at;
        t = (c2 > best) | (c2 != c2);
        best = t ? c2 : best;
        at = t ? W : at;
        t = (c3 > best) | (c3 != c3);
        best = t ? c3 : best;
        at = t ? W + 1 : at;
        out[q] = best;
        offset[q] = at;
    }
}

// The whole windows of a plane: P0 = H / 2 rows of Q0 = W / 2, output rows out_stride apart.
template <typename T>
void max_pool2x2_whole(T* out, int64_t* idx, const T* in, int64_t W, int64_t P0, int64_t Q0,
                       int64_t out_stride) {
    int32_t offset[kRun];
    for (int64_t p = 0; p < P0; ++p)
        for (int64_t q0 = 0; q0 < Q0; q0 += kRun) {
            const int64_t n = std::min(kRun, Q0 - q0);
            const T* row0 = in + 2 * p * W + 2 * q0;
            pool2x2_run(out + p * out_stride + q0, offset, row0, row0 + W, n,
                        static_cast<int32_t>(W));
            int64_t* __restrict to = idx + p * out_stride + q0;
            const int64_t first = 2 * p * W + 2 * q0;  // the run's first window's first cell
            for (int64_t q = 0; q < n; ++q) to[q] = first + 2 * q + offset[q];
        }
}

// n windows of two cells, a[i * stride] then b[i * stride]: the best value and whether the
// second cell won, by the rule of takes(), in a loop the compiler vectorizes (a branch per
// window would cost more than the window).
template <typename T>
void pick2_run(T* __restrict best, int32_t* __restrict second, const T* __restrict a,
               const T* __restrict b, int64_t n, int64_t stride) {
    for (int64_t i = 0; i < n; ++i) {
        const T x = a[i * stride], y = b[i * stride];
        const bool t = (y > x) | (y != y);
        best[i] = t ? y : x;
        second[i] = t;
    }
}

// The partial windows of a ceil_mode 2x2 / stride 2 pool of an odd size, which
// max_pool2x2_whole leaves (P0 = H / 2, Q0 = W / 2 whole windows, output rows Q apart): with
// W odd the last column's windows hold cells (2p, W-1) and (2p+1, W-1), with H odd the last
// row's hold (H-1, 2q) and (H-1, 2q+1), with both the corner holds (H-1, W-1) alone. (A
// pass of its own: measured faster than a window at the end of each row.)
template <typename T>
void max_pool2x2_edges(T* out, int64_t* idx, const T* in, int64_t H, int64_t W, int64_t P,
                       int64_t Q) {
    const int64_t P0 = H / 2, Q0 = W / 2;
    T best[kRun];
    int32_t second[kRun];
    if (Q > Q0)  // the last column: cells 2W apart
        for (int64_t p0 = 0; p0 < P0; p0 += kRun) {
            const int64_t n = std::min(kRun, P0 - p0);
            const int64_t first = 2 * p0 * W + W - 1;
            pick2_run(best, second, in + first, in + first + W, n, 2 * W);
            for (int64_t i = 0; i < n; ++i) {
                out[(p0 + i) * Q + Q0] = best[i];
                idx[(p0 + i) * Q + Q0] = first + 2 * i * W + second[i] * W;
            }
        }
    if (P > P0) {  // the last row: cells side by side
        const int64_t row = (H - 1) * W;
        for (int64_t q0 = 0; q0 < Q0; q0 += kRun) {
            const int64_t n = std::min(kRun, Q0 - q0);
            pick2_run(out + P0 * Q + q0, second, in + row + 2 * q0, in + row + 2 * q0 + 1, n, 2);
            for (int64_t i = 0; i < n; ++i) idx[P0 * Q + q0 + i] = row + 2 * (q0 + i) + second[i];
        }
        if (Q > Q0) {  // the corner
            out[P0 * Q + Q0] = in[row + W - 1];
            idx[P0 * Q + Q0] = row + W - 1;
        }
    }
}

// Floored or ceil_mode: the whole windows, then the partial ones.
template <typename T>
void max_pool2x2_plane(T* out, int64_t* idx, const T* in, int64_t H, int64_t W, int64_t P,
                       int64_t Q) {
    max_pool2x2_whole(out, idx, in, W, H / 2, W / 2, Q);
    if (P > H / 2 || Q > W / 2) max_pool2x2_edges(out, idx, in, H, W, P, Q);
}

template void max_pool2x2_plane<float>(float*, int64_t*, const float*, int64_t, int64_t, int64_t,
                                       int64_t);
template void max_pool2x2_plane<double>(double*, int64_t*, const double*, int64_t, int64_t, int64_t,
                                        int64_t);

Pool2x2ChunksForward max_pool2x2_chunks_avx512_if_supported() {
#if defined(CNNBP_AVX512_KERNELS)
    if (avx512_kernels_enabled()) return max_pool2x2_chunks_avx512;
#endif
    return nullptr;
}

Pool2x2ChunksBackward max_unpool2x2_chunks_avx512_if_supported() {
#if defined(CNNBP_AVX512_KERNELS)
    if (avx512_kernels_enabled()) return max_unpool2x2_chunks_avx512;
#endif
    return nullptr;
}

Pool2x2Forward max_pool2x2_plane_avx512_if_supported() {
#if defined(CNNBP_AVX512_KERNELS)
    if (avx512_kernels_enabled()) return max_pool2x2_plane_avx512;
#endif
    return nullptr;
}

Pool2x2Backward max_unpool2x2_plane_avx512_if_supported() {
#if defined(CNNBP_AVX512_KERNELS)
    if (avx512_kernels_enabled()) return max_unpool2x2_plane_avx512;
#endif
    return nullptr;
}

}  // namespace detail

namespace {

// Whether the (H, W) planes of a 2x2 / stride 2 pool with (P, Q) outputs take the chunk
// kernels (pool2d_simd.hpp): floored, H and W even, W <= 16, the 16 windows of a chunk in
// whole rows (Q divides 16), and in whole planes or in one plane.
bool small_2x2_planes(int64_t H, int64_t W, int64_t P, int64_t Q) {
    const int64_t PQ = P * Q;
    return H % 2 == 0 && W % 2 == 0 && P == H / 2 && Q == W / 2 && W <= 16 && PQ > 0 &&
           16 % Q == 0 && (16 % PQ == 0 || PQ % 16 == 0);
}

// The chunk kernels' work in units of whole planes: a unit is the planes of one chunk (P*Q
// <= 16) or the chunks of one plane; the planes past the last whole unit (fewer than 16) take
// the plane kernels.
struct ChunkUnits {
    int64_t planes, chunks, count;
};

ChunkUnits chunk_units(const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q;
    const int64_t planes = PQ < 16 ? 16 / PQ : 1, chunks = PQ < 16 ? 1 : PQ / 16;
    return {planes, chunks, d.N * d.C / planes};
}

}  // namespace

template <typename T>
void max_pool2d_forward(T* output, int64_t* indices, const T* input, const Pool2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    // 2x2 / stride 2 windows without padding or dilation: the 2x2 plane kernels, which also
    // compute the last row or column of partial windows that ceil_mode adds to an odd size.
    // They keep window offsets in 32 bits: wider planes take the general kernel.
    const bool is2x2 = p.kernel_h == 2 && p.kernel_w == 2 && p.stride_h == 2 && p.stride_w == 2 &&
                       p.pad_h == 0 && p.pad_w == 0 && p.dilation_h == 1 && p.dilation_w == 1 &&
                       d.W < detail::kMaxSimdWidth;
    // float 2x2 pools run the AVX-512 plane kernel when the CPU has one
    [[maybe_unused]] detail::Pool2x2Forward simd = nullptr;
    if constexpr (std::is_same_v<T, float>)
        if (is2x2) simd = detail::max_pool2x2_plane_avx512_if_supported();
    const int64_t work = d.N * d.C * PQ * p.kernel_h * p.kernel_w;
    auto pool_planes = [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            const T* in = input + nc * HW;  // (H, W) plane of input[n, c]
            T* out = output + nc * PQ;
            int64_t* idx = indices + nc * PQ;
            if (!is2x2) {
                max_pool_plane(out, idx, in, d);
                continue;
            }
            bool done = false;
            if constexpr (std::is_same_v<T, float>)
                if (simd) {
                    simd(out, idx, in, d.H, d.W, d.P, d.Q);
                    done = true;
                }
            if (!done) detail::max_pool2x2_plane(out, idx, in, d.H, d.W, d.P, d.Q);
        }
    };
    if constexpr (std::is_same_v<T, float>) {
        // small planes, many at once
        const detail::Pool2x2ChunksForward chunks =
            is2x2 && small_2x2_planes(d.H, d.W, d.P, d.Q)
                ? detail::max_pool2x2_chunks_avx512_if_supported()
                : nullptr;
        if (chunks) {
            const ChunkUnits units = chunk_units(d);
            detail::parallel_for(units.count, work, [&](int64_t begin, int64_t end) {
                chunks(output, indices, input, d.H, d.W, begin * units.chunks, end * units.chunks);
            });
            pool_planes(units.count * units.planes, d.N * d.C);
            return;
        }
    }
    detail::parallel_for(d.N * d.C, work, pool_planes);
}

namespace {

// Zero-fill and scatter: right for any indices, overlapping windows add up.
template <typename T>
void max_unpool_plane(T* din, const T* dout, const int64_t* idx, int64_t HW, int64_t PQ) {
    std::fill(din, din + HW, T(0));
    // Inverts `out = in[best_index]`: the gradient goes to the chosen cell only.
    for (int64_t i = 0; i < PQ; ++i) din[idx[i]] += dout[i];
}

}  // namespace

template <typename T>
void max_pool2d_backward(T* dinput, const T* doutput, const int64_t* indices, const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    // The indices do not say which pool made them; on a CPU with AVX-512 a float plane is
    // written in one pass when they fit the 2x2 tiling (floored, or with ceil_mode's partial
    // windows of an odd size), which the plane kernel checks as it goes.
    [[maybe_unused]] detail::Pool2x2Backward simd = nullptr;
    if constexpr (std::is_same_v<T, float>) {
        const bool tiles2x2 = (d.P == d.H / 2 || d.P == (d.H + 1) / 2) &&
                              (d.Q == d.W / 2 || d.Q == (d.W + 1) / 2) &&
                              d.W < detail::kMaxSimdWidth;
        if (tiles2x2) simd = detail::max_unpool2x2_plane_avx512_if_supported();
    }
    const int64_t work = d.N * d.C * (PQ + HW);
    auto unpool_planes = [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            T* din = dinput + nc * HW;
            const T* dout = doutput + nc * PQ;
            const int64_t* idx = indices + nc * PQ;
            if constexpr (std::is_same_v<T, float>)
                if (simd && simd(din, dout, idx, d.H, d.W, d.P, d.Q)) continue;
            max_unpool_plane(din, dout, idx, HW, PQ);
        }
    };
    if constexpr (std::is_same_v<T, float>) {
        // small planes, many at once; a thread's share redone plane by plane if some index
        // does not fit
        const detail::Pool2x2ChunksBackward chunks =
            small_2x2_planes(d.H, d.W, d.P, d.Q)
                ? detail::max_unpool2x2_chunks_avx512_if_supported()
                : nullptr;
        if (chunks) {
            const ChunkUnits units = chunk_units(d);
            detail::parallel_for(units.count, work, [&](int64_t begin, int64_t end) {
                if (!chunks(dinput, doutput, indices, d.H, d.W, begin * units.chunks,
                            end * units.chunks))
                    unpool_planes(begin * units.planes, end * units.planes);
            });
            unpool_planes(units.count * units.planes, d.N * d.C);
            return;
        }
    }
    detail::parallel_for(d.N * d.C, work, unpool_planes);
}

// ---- avg_pool2d ----------------------------------------------------------------------------
//
// Both directions walk a plane by output row p and window row r, then by window column s,
// with the output columns q innermost: that loop reads (forward) or writes (backward) a run
// of cells w = q*sw - pw + s, contiguous for unit strides, which the compiler vectorizes.
// The order of the additions into each element is still torch's (see each kernel).

namespace {

// acc[i] += src[i * stride] for i in [0, n)
template <typename T>
inline void add_from_strided(T* __restrict acc, const T* __restrict src, int64_t n,
                             int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
    else
        for (int64_t i = 0; i < n; ++i) acc[i] += src[i * stride];
}

// dst[i * stride] += g[i] for i in [0, n); distinct i write distinct cells (stride >= 1)
template <typename T>
inline void add_to_strided(T* __restrict dst, const T* __restrict g, int64_t n, int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; ++i) dst[i] += g[i];
    else
        for (int64_t i = 0; i < n; ++i) dst[i * stride] += g[i];
}

// The divisor of each window of output row op, torch's rule: divisor_override when given;
// else with count_include_pad the window's cells inside the padded input (a ceil_mode
// window hanging past the right padding counts only up to it), without it the window's
// cells inside the input.
template <typename T>
void row_divisors(T* divisor, int64_t op, const Pool2dDims& d) {
    const auto& p = d.params;
    if (p.divisor_override) {
        std::fill(divisor, divisor + d.Q, T(*p.divisor_override));
        return;
    }
    const int64_t h_start = op * p.stride_h - p.pad_h;
    const int64_t rows = p.count_include_pad
                             ? std::min(h_start + p.kernel_h, d.H + p.pad_h) - h_start
                             : std::min(h_start + p.kernel_h, d.H) - std::max<int64_t>(h_start, 0);
    for (int64_t q = 0; q < d.Q; ++q) {
        const int64_t w_start = q * p.stride_w - p.pad_w;
        const int64_t columns =
            p.count_include_pad
                ? std::min(w_start + p.kernel_w, d.W + p.pad_w) - w_start
                : std::min(w_start + p.kernel_w, d.W) - std::max<int64_t>(w_start, 0);
        divisor[q] = T(rows * columns);
    }
}

template <typename T>
void avg_pool_plane(T* out, const T* in, T* divisor, const Pool2dDims& d) {
    const auto& p = d.params;
    for (int64_t op = 0; op < d.P; ++op) {
        T* row_out = out + op * d.Q;
        std::fill(row_out, row_out + d.Q, T(0));
        // window rows [h0, h1) clipped to the plane: padding adds nothing
        const int64_t h_start = op * p.stride_h - p.pad_h;
        const int64_t h0 = std::max<int64_t>(h_start, 0);
        const int64_t h1 = std::min(h_start + p.kernel_h, d.H);
        // For each output, window cells arrive row by row and, within a row, by column s:
        // the row-major order in which torch sums a window.
        for (int64_t h = h0; h < h1; ++h)
            for (int64_t s = 0; s < p.kernel_w; ++s) {
                int64_t lo, hi;  // outputs whose window column s lies inside the plane
                detail::valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, lo, hi);
                const int64_t w_first = lo * p.stride_w - p.pad_w + s;  // >= 0 when lo < hi
                if (lo < hi)
                    add_from_strided(row_out + lo, in + (h * d.W + w_first), hi - lo, p.stride_w);
            }
        row_divisors(divisor, op, d);
        for (int64_t q = 0; q < d.Q; ++q) row_out[q] /= divisor[q];
    }
}

// Inverts `row_out[q] = sum(window) / divisor[q]`: every cell of the window inside the plane
// receives g = doutput / divisor[q]. Torch scatters g window by window in row-major order of
// (p, q); here window rows are visited by p, and the columns s from last to first, so that
// within an output row every cell still receives its windows' g in increasing q: the same
// additions in the same order, so the same bits.
template <typename T>
void avg_unpool_plane(T* din, const T* dout, T* g, const Pool2dDims& d) {
    const auto& p = d.params;
    std::fill(din, din + d.H * d.W, T(0));
    for (int64_t op = 0; op < d.P; ++op) {
        row_divisors(g, op, d);
        for (int64_t q = 0; q < d.Q; ++q) g[q] = dout[op * d.Q + q] / g[q];
        const int64_t h_start = op * p.stride_h - p.pad_h;
        const int64_t h0 = std::max<int64_t>(h_start, 0);
        const int64_t h1 = std::min(h_start + p.kernel_h, d.H);
        for (int64_t h = h0; h < h1; ++h)
            for (int64_t s = p.kernel_w - 1; s >= 0; --s) {
                int64_t lo, hi;
                detail::valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, lo, hi);
                const int64_t w_first = lo * p.stride_w - p.pad_w + s;
                if (lo < hi) add_to_strided(din + (h * d.W + w_first), g + lo, hi - lo, p.stride_w);
            }
    }
}

}  // namespace

template <typename T>
void avg_pool2d_forward(T* output, const T* input, const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    const int64_t work = d.N * d.C * PQ * d.params.kernel_h * d.params.kernel_w;
    detail::parallel_for(d.N * d.C, work, [&](int64_t begin, int64_t end) {
        std::vector<T> divisor(d.Q);  // one output row's divisors
        for (int64_t nc = begin; nc < end; ++nc)
            avg_pool_plane(output + nc * PQ, input + nc * HW, divisor.data(), d);
    });
}

template <typename T>
void avg_pool2d_backward(T* dinput, const T* doutput, const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    const int64_t work = d.N * d.C * (PQ * d.params.kernel_h * d.params.kernel_w + HW);
    detail::parallel_for(d.N * d.C, work, [&](int64_t begin, int64_t end) {
        std::vector<T> g(d.Q);  // one output row divided by its divisors
        for (int64_t nc = begin; nc < end; ++nc)
            avg_unpool_plane(dinput + nc * HW, doutput + nc * PQ, g.data(), d);
    });
}

#define CNNBP_INSTANTIATE(T)                                                               \
    template void max_pool2d_forward<T>(T*, int64_t*, const T*, const Pool2dDims&);        \
    template void max_pool2d_backward<T>(T*, const T*, const int64_t*, const Pool2dDims&); \
    template void avg_pool2d_forward<T>(T*, const T*, const Pool2dDims&);                  \
    template void avg_pool2d_backward<T>(T*, const T*, const Pool2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
