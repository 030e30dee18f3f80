// adaptive_avg_pool2d, forward and backward. N batch, C channels, H/W input, P/Q output.
//
// Every (n, c) plane is independent: the planes are shared among threads and each plane's
// result is computed by one thread in one fixed order, so results do not depend on the thread
// count. The windows' bounds along each axis are computed once per call (torch's rule, see
// shapes.hpp), not per output cell.
#include "cnnbp/adaptive_pool2d.hpp"

#include <algorithm>
#include <vector>

#include "parallel.hpp"

namespace cnnbp {
namespace {

// The windows of one axis: output o covers input cells [start[o], end[o]).
struct AxisWindows {
    std::vector<int64_t> start, end;
    int64_t cells = 0;  // the windows' cells in all
    AxisWindows(int64_t in, int64_t out) : start(size_t(out)), end(size_t(out)) {
        for (int64_t o = 0; o < out; ++o) {
            start[size_t(o)] = adaptive_start(o, in, out);
            end[size_t(o)] = adaptive_end(o, in, out);
            cells += end[size_t(o)] - start[size_t(o)];
        }
    }
};

// The sum of n values in double, over 8 running sums (lane i takes the values i, i + 8, ...)
// added up in a fixed order at the end: independent chains the compiler vectorizes, and the
// same result for any thread count.
template <typename T>
double plane_sum(const T* x, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lane[k] += double(x[i + k]);
    for (int k = 0; i < n; ++i, ++k) lane[k] += double(x[i]);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

template <typename T>
void adaptive_pool_plane(T* out, const T* in, const AdaptivePool2dDims& d, const AxisWindows& rows,
                         const AxisWindows& cols) {
    for (int64_t p = 0; p < d.P; ++p) {
        const int64_t h0 = rows.start[size_t(p)], h1 = rows.end[size_t(p)];
        const T kh = T(h1 - h0);
        for (int64_t q = 0; q < d.Q; ++q) {
            const int64_t w0 = cols.start[size_t(q)], w1 = cols.end[size_t(q)];
            T sum = 0;  // row-major, in T: torch's order and precision
            for (int64_t h = h0; h < h1; ++h)
                for (int64_t w = w0; w < w1; ++w) sum += in[h * d.W + w];
            out[p * d.Q + q] = sum / kh / T(w1 - w0);
        }
    }
}

// Inverts `out[p * Q + q] = sum / kh / kw`: every cell of window (p, q) receives
// g = dout / kh / kw, the windows visited in row-major order (torch's), so cells that windows
// share add their shares in torch's order.
template <typename T>
void adaptive_unpool_plane(T* din, const T* dout, const AdaptivePool2dDims& d,
                           const AxisWindows& rows, const AxisWindows& cols) {
    std::fill(din, din + d.H * d.W, T(0));
    for (int64_t p = 0; p < d.P; ++p) {
        const int64_t h0 = rows.start[size_t(p)], h1 = rows.end[size_t(p)];
        const T kh = T(h1 - h0);
        for (int64_t q = 0; q < d.Q; ++q) {
            const int64_t w0 = cols.start[size_t(q)], w1 = cols.end[size_t(q)];
            const T g = dout[p * d.Q + q] / kh / T(w1 - w0);
            for (int64_t h = h0; h < h1; ++h)
                for (int64_t w = w0; w < w1; ++w) din[h * d.W + w] += g;
        }
    }
}

bool is_global(const AdaptivePool2dDims& d) { return d.P == 1 && d.Q == 1; }

}  // namespace

template <typename T>
void adaptive_avg_pool2d_forward(T* output, const T* input, const AdaptivePool2dDims& d) {
    const int64_t HW = d.H * d.W, PQ = d.P * d.Q;
    if (is_global(d)) {
        // output = sum(plane) / (H * W)
        const double count = double(HW);
        detail::parallel_for(d.N * d.C, d.N * d.C * HW, [&](int64_t begin, int64_t end) {
            for (int64_t nc = begin; nc < end; ++nc)
                output[nc] = T(plane_sum(input + nc * HW, HW) / count);
        });
        return;
    }
    const AxisWindows rows(d.H, d.P), cols(d.W, d.Q);
    const int64_t work = d.N * d.C * rows.cells * cols.cells;
    detail::parallel_for(d.N * d.C, work, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc)
            adaptive_pool_plane(output + nc * PQ, input + nc * HW, d, rows, cols);
    });
}

template <typename T>
void adaptive_avg_pool2d_backward(T* dinput, const T* doutput, const AdaptivePool2dDims& d) {
    const int64_t HW = d.H * d.W, PQ = d.P * d.Q;
    if (is_global(d)) {
        // inverts output = sum(plane) / (H * W): every cell gets doutput / (H * W)
        const T count = T(HW);
        detail::parallel_for(d.N * d.C, d.N * d.C * HW, [&](int64_t begin, int64_t end) {
            for (int64_t nc = begin; nc < end; ++nc)
                std::fill(dinput + nc * HW, dinput + (nc + 1) * HW, doutput[nc] / count);
        });
        return;
    }
    const AxisWindows rows(d.H, d.P), cols(d.W, d.Q);
    const int64_t work = d.N * d.C * (rows.cells * cols.cells + HW);
    detail::parallel_for(d.N * d.C, work, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc)
            adaptive_unpool_plane(dinput + nc * HW, doutput + nc * PQ, d, rows, cols);
    });
}

#define CNNBP_INSTANTIATE(T)                                                               \
    template void adaptive_avg_pool2d_forward<T>(T*, const T*, const AdaptivePool2dDims&); \
    template void adaptive_avg_pool2d_backward<T>(T*, const T*, const AdaptivePool2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
