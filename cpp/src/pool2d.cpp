// max_pool2d forward and backward. N batch, C channels, H/W input, P/Q output.
//
// Every (n, c) plane is independent, so the planes are shared among threads and each plane's
// result is computed by one thread in one fixed order: results do not depend on the thread
// count. The common 2x2 / stride 2 / no padding pool has a kernel of its own (AVX-512 when the
// CPU has it, else portable loops) that visits the window cells in the same order with the
// same comparisons as the general kernel, so the two agree bit for bit.
#include "cnnbp/pool2d.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

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

// Any window size, stride and padding; windows clipped to the plane, padding is -inf.
template <typename T>
void max_pool_plane(T* out, int64_t* idx, const T* in, const Pool2dDims& d) {
    const auto& p = d.params;
    for (int64_t op = 0; op < d.P; ++op) {
        // window rows [h0, h1) clipped to the plane: padding is -inf and never wins
        const int64_t h_start = op * p.stride_h - p.pad_h;
        const int64_t h0 = std::max<int64_t>(h_start, 0);
        const int64_t h1 = std::min(h_start + p.kernel_h, d.H);
        for (int64_t oq = 0; oq < d.Q; ++oq) {
            const int64_t w_start = oq * p.stride_w - p.pad_w;
            const int64_t w0 = std::max<int64_t>(w_start, 0);
            const int64_t w1 = std::min(w_start + p.kernel_w, d.W);
            // An all -inf window reports its first in-bounds cell.
            int64_t best_index = h0 * d.W + w0;
            T best = -std::numeric_limits<T>::infinity();
            for (int64_t h = h0; h < h1; ++h)
                for (int64_t w = w0; w < w1; ++w) {
                    const T value = in[h * d.W + w];
                    if (takes(value, best)) {
                        best = value;
                        best_index = h * d.W + w;
                    }
                }
            out[op * d.Q + oq] = best;
            idx[op * d.Q + oq] = best_index;
        }
    }
}

}  // namespace

namespace detail {

// 2x2 windows at stride 2, no padding: every window lies inside the plane. The first cell
// is always taken (value > -inf, or NaN; a -inf first cell leaves best = -inf at its own
// index), then the other three in row-major order. Written without branches so that the
// compiler can vectorize it.
template <typename T>
void max_pool2x2_plane(T* out, int64_t* idx, const T* in, int64_t W, int64_t P, int64_t Q) {
    for (int64_t p = 0; p < P; ++p) {
        const T* row0 = in + 2 * p * W;
        const T* row1 = row0 + W;
        for (int64_t q = 0; q < Q; ++q) {
            const T c1 = row0[2 * q + 1], c2 = row1[2 * q], c3 = row1[2 * q + 1];
            T best = row0[2 * q];
            int64_t offset = 0;
            const bool t1 = takes(c1, best);
            best = t1 ? c1 : best;
            offset = t1 ? 1 : offset;
            const bool t2 = takes(c2, best);
            best = t2 ? c2 : best;
            offset = t2 ? W : offset;
            const bool t3 = takes(c3, best);
            best = t3 ? c3 : best;
            offset = t3 ? W + 1 : offset;
            out[p * Q + q] = best;
            idx[p * Q + q] = 2 * p * W + 2 * q + offset;
        }
    }
}

// The same result written in one pass when the plane is tiled by disjoint 2x2 windows
// (P = H / 2, Q = W / 2) and every index lies in its own window, as a 2x2 / stride 2 pool
// produces: each cell then receives at most one gradient. Returns false, with the plane
// partly written, when some index lies elsewhere; the caller then scatters instead.
template <typename T>
bool max_unpool2x2_plane(T* din, const T* dout, const int64_t* idx, int64_t H, int64_t W,
                         int64_t P, int64_t Q) {
    for (int64_t p = 0; p < P; ++p) {
        T* row0 = din + 2 * p * W;
        T* row1 = row0 + W;
        bool inside = true;
        for (int64_t q = 0; q < Q; ++q) {
            const int64_t offset = idx[p * Q + q] - (2 * p * W + 2 * q);
            inside &= offset == 0 || offset == 1 || offset == W || offset == W + 1;
        }
        if (!inside) return false;
        for (int64_t q = 0; q < Q; ++q) {
            const int64_t offset = idx[p * Q + q] - (2 * p * W + 2 * q);
            // 0 + dy, as the zero-filled cell plus the gradient (turns -0 into +0 the same way)
            const T g = T(0) + dout[p * Q + q];
            row0[2 * q] = offset == 0 ? g : T(0);
            row0[2 * q + 1] = offset == 1 ? g : T(0);
            row1[2 * q] = offset == W ? g : T(0);
            row1[2 * q + 1] = offset == W + 1 ? g : T(0);
        }
        if (W > 2 * Q) row0[W - 1] = row1[W - 1] = T(0);  // odd width: a column no window sees
    }
    if (H > 2 * P) std::fill(din + (H - 1) * W, din + H * W, T(0));  // odd height: a row
    return true;
}

template void max_pool2x2_plane<float>(float*, int64_t*, const float*, int64_t, int64_t, int64_t);
template void max_pool2x2_plane<double>(double*, int64_t*, const double*, int64_t, int64_t, int64_t);
template bool max_unpool2x2_plane<float>(float*, const float*, const int64_t*, int64_t, int64_t,
                                         int64_t, int64_t);
template bool max_unpool2x2_plane<double>(double*, const double*, const int64_t*, int64_t,
                                          int64_t, int64_t, int64_t);

namespace {
bool cpu_has_avx512f() {
#if defined(CNNBP_POOL_AVX512)
    static const bool yes = __builtin_cpu_supports("avx512f");
    return yes;
#else
    return false;
#endif
}
}  // namespace

Pool2x2Forward max_pool2x2_plane_avx512_if_supported() {
#if defined(CNNBP_POOL_AVX512)
    if (cpu_has_avx512f()) return max_pool2x2_plane_avx512;
#endif
    return nullptr;
}

Pool2x2Backward max_unpool2x2_plane_avx512_if_supported() {
#if defined(CNNBP_POOL_AVX512)
    if (cpu_has_avx512f()) return max_unpool2x2_plane_avx512;
#endif
    return nullptr;
}

}  // namespace detail

template <typename T>
void max_pool2d_forward(T* output, int64_t* indices, const T* input, const Pool2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    const bool is2x2 = p.kernel_h == 2 && p.kernel_w == 2 && p.stride_h == 2 &&
                       p.stride_w == 2 && p.pad_h == 0 && p.pad_w == 0;
    // float 2x2 pools run the AVX-512 plane kernel when the CPU has one
    [[maybe_unused]] detail::Pool2x2Forward simd = nullptr;
    if constexpr (std::is_same_v<T, float>)
        if (is2x2 && d.W < detail::kMaxSimdWidth)
            simd = detail::max_pool2x2_plane_avx512_if_supported();
    const int64_t work = d.N * d.C * PQ * p.kernel_h * p.kernel_w;
    detail::parallel_for(d.N * d.C, work, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            const T* in = input + nc * HW;  // (H, W) plane of input[n, c]
            T* out = output + nc * PQ;
            int64_t* idx = indices + nc * PQ;
            if constexpr (std::is_same_v<T, float>)
                if (simd) {
                    simd(out, idx, in, d.W, d.P, d.Q);
                    continue;
                }
            if (is2x2)
                detail::max_pool2x2_plane(out, idx, in, d.W, d.P, d.Q);
            else
                max_pool_plane(out, idx, in, d);
        }
    });
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
void max_pool2d_backward(T* dinput, const T* doutput, const int64_t* indices,
                         const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    // The indices do not say which pool made them; a plane can be written in one pass when
    // they fit the 2x2 tiling, which the plane kernels check as they go.
    const bool tiles2x2 = d.P == d.H / 2 && d.Q == d.W / 2;
    [[maybe_unused]] detail::Pool2x2Backward simd = nullptr;
    if constexpr (std::is_same_v<T, float>)
        if (d.W < detail::kMaxSimdWidth)
            simd = detail::max_unpool2x2_plane_avx512_if_supported();
    detail::parallel_for(d.N * d.C, d.N * d.C * (PQ + HW), [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            T* din = dinput + nc * HW;
            const T* dout = doutput + nc * PQ;
            const int64_t* idx = indices + nc * PQ;
            if (tiles2x2) {
                bool done;
                if constexpr (std::is_same_v<T, float>)
                    done = simd ? simd(din, dout, idx, d.H, d.W, d.P, d.Q)
                                : detail::max_unpool2x2_plane(din, dout, idx, d.H, d.W, d.P, d.Q);
                else
                    done = detail::max_unpool2x2_plane(din, dout, idx, d.H, d.W, d.P, d.Q);
                if (done) continue;
            }
            max_unpool_plane(din, dout, idx, HW, PQ);
        }
    });
}

#define CNNBP_INSTANTIATE(T)                                                              \
    template void max_pool2d_forward<T>(T*, int64_t*, const T*, const Pool2dDims&);      \
    template void max_pool2d_backward<T>(T*, const T*, const int64_t*, const Pool2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
