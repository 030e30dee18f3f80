// The pooling kernels' fast paths against plain loops written from the rule, bit for bit:
// the 2x2 / stride 2 max-pool kernels (portable and AVX-512) on ties, NaN, infinities, -0,
// and sizes that leave a remainder row, column or partial vector step, floored or with
// ceil_mode's partial windows; the backward against the scatter, strays included; avg_pool2d's
// reordered loops against torch's window-by-window ones, and its results for one and two
// threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "../src/pool2d_simd.hpp"
#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using cnnbp_test::bytes_of;
using cnnbp_test::random_values;
using cnnbp_test::same_bits;

namespace {

// Few distinct values (so windows tie), with NaN, -inf, +inf and -0 sprinkled in.
template <typename T>
std::vector<T> tricky_values(size_t count, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> pick(0, 19);
    const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> v(count);
    for (auto& x : v) {
        const int k = pick(gen);
        x = k == 0 ? nan : k == 1 ? -inf : k == 2 ? inf : k == 3 ? T(-0.0) : T(k % 4) - T(1.5);
    }
    return v;
}

// The rule, window by window: start at -inf on the first cell, take a cell when it is
// greater or NaN. P x Q windows of 2x2 / stride 2, clipped to the input: P = H / 2 or
// (H + 1) / 2 (ceil_mode, whose last row of windows holds one input row when H is odd), Q
// likewise.
template <typename T>
void reference_pool2x2(std::vector<T>& y, std::vector<int64_t>& idx, const std::vector<T>& x,
                       int64_t planes, int64_t H, int64_t W, int64_t P, int64_t Q) {
    for (int64_t n = 0; n < planes; ++n)
        for (int64_t p = 0; p < P; ++p)
            for (int64_t q = 0; q < Q; ++q) {
                T best = -std::numeric_limits<T>::infinity();
                int64_t at = 2 * p * W + 2 * q;
                for (int64_t h = 2 * p; h < std::min(2 * p + 2, H); ++h)
                    for (int64_t w = 2 * q; w < std::min(2 * q + 2, W); ++w) {
                        const T v = x[n * H * W + h * W + w];
                        if (v > best || std::isnan(v)) {
                            best = v;
                            at = h * W + w;
                        }
                    }
                y[(n * P + p) * Q + q] = best;
                idx[(n * P + p) * Q + q] = at;
            }
}

template <typename T>
std::vector<T> reference_unpool(const std::vector<T>& dy, const std::vector<int64_t>& idx,
                                int64_t planes, int64_t HW, int64_t PQ) {
    std::vector<T> dx(planes * HW, T(0));
    for (int64_t n = 0; n < planes; ++n)
        for (int64_t i = 0; i < PQ; ++i) dx[n * HW + idx[n * PQ + i]] += dy[n * PQ + i];
    return dx;
}

// Sizes with a remainder row, column or partial vector step, floored and ceil_mode (odd
// sizes: a last row or column of partial windows); the sizes of 1 only with ceil_mode,
// which gives them a window.
const std::vector<std::pair<int64_t, int64_t>> kSizes = {
    {2, 2},   {3, 3},   {4, 4},  {2, 5},  {5, 2},  {7, 9},  {26, 26}, {27, 27},
    {32, 32}, {33, 35}, {4, 34}, {6, 63}, {3, 66}, {2, 97}, {5, 31},  {3, 33}};
const std::vector<std::pair<int64_t, int64_t>> kCeilOnlySizes = {{1, 1},  {1, 2}, {1, 7},
                                                                 {1, 33}, {2, 1}, {7, 1}};

// A plane and its 2x2 windows: each dim floored or rounded up (ceil_mode, or for the
// backward, which knows only the sizes, a pool that rounds one dim up and not the other).
struct Shape2x2 {
    int64_t H, W;
    bool ceil_h, ceil_w;
    int64_t P() const { return ceil_h ? (H + 1) / 2 : H / 2; }
    int64_t Q() const { return ceil_w ? (W + 1) / 2 : W / 2; }
    bool uniform() const { return ceil_h == ceil_w; }  // a 2x2 max_pool2d's rounding
    std::string where() const {
        return std::to_string(H) + "x" + std::to_string(W) +
               (uniform() ? (ceil_h ? " ceil_mode" : "")
                : ceil_h  ? " rows up"
                          : " columns up");
    }
};

// every size floored and rounded up; odd sizes rounded up in one dim only too
std::vector<Shape2x2> pool2x2_shapes() {
    std::vector<Shape2x2> shapes;
    for (auto [H, W] : kSizes) {
        shapes.push_back({H, W, false, false});
        shapes.push_back({H, W, true, true});
        if (H % 2 == 1 && W % 2 == 1) {
            shapes.push_back({H, W, true, false});
            shapes.push_back({H, W, false, true});
        }
    }
    for (auto [H, W] : kCeilOnlySizes) shapes.push_back({H, W, true, true});
    return shapes;
}

constexpr int64_t kGuard = 40;  // cells around each plane that a plane kernel must not touch

// A plane kernel's output for each of `planes` planes of `size` elements, each in a buffer
// of garbage with kGuard cells either side; fails when a guard cell changed.
template <typename T, typename Kernel>
std::vector<T> run_on_planes(int64_t planes, int64_t size, const std::string& what, Kernel kernel) {
    std::vector<T> result(size_t(planes * size));
    for (int64_t n = 0; n < planes; ++n) {
        std::vector<T> buffer(size_t(size + 2 * kGuard), T(7));
        kernel(n, buffer.data() + kGuard);
        const std::vector<T> before(buffer.begin(), buffer.begin() + kGuard),
            after(buffer.end() - kGuard, buffer.end()), garbage(size_t(kGuard), T(7));
        if (!same_bits(before, garbage) || !same_bits(after, garbage))
            cnnbp_test::fail(__FILE__, __LINE__, what + " wrote outside its plane");
        std::copy(buffer.begin() + kGuard, buffer.end() - kGuard, result.begin() + n * size);
    }
    return result;
}

template <typename T>
void check_forward_paths(unsigned seed) {
    const int64_t planes = 3;
    for (const auto& shape : pool2x2_shapes()) {
        const int64_t H = shape.H, W = shape.W, P = shape.P(), Q = shape.Q();
        const std::string where = shape.where();
        const auto x = tricky_values<T>(planes * H * W, seed + unsigned(H * 131 + W));
        std::vector<T> want_y(planes * P * Q), y(want_y.size());
        std::vector<int64_t> want_idx(want_y.size()), idx(want_y.size());
        reference_pool2x2(want_y, want_idx, x, planes, H, W, P, Q);

        auto check = [&](const char* path) {
            if (!same_bits(y, want_y) || idx != want_idx)
                cnnbp_test::fail(__FILE__, __LINE__, std::string(path) + " differs at " + where);
        };
        if (shape.uniform()) {
            const auto d =
                pool2d_dims("max_pool2d", {planes, 1, H, W},
                            cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, shape.ceil_h));
            CHECK(d.P == P && d.Q == Q);
            max_pool2d_forward(y.data(), idx.data(), x.data(), d);
            check("max_pool2d_forward");
        }
        auto check_plane = [&](const char* path, auto kernel) {
            std::vector<int64_t> plane_idx;
            y = run_on_planes<T>(planes, P * Q, path, [&](int64_t n, T* out) {
                std::vector<int64_t> buffer(size_t(P * Q + 2 * kGuard), -7);
                kernel(out, buffer.data() + kGuard, x.data() + n * H * W);
                for (int64_t i = 0; i < kGuard; ++i)
                    if (buffer[i] != -7 || buffer[kGuard + P * Q + i] != -7)
                        cnnbp_test::fail(__FILE__, __LINE__,
                                         std::string(path) + " wrote outside its indices");
                plane_idx.insert(plane_idx.end(), buffer.begin() + kGuard, buffer.end() - kGuard);
            });
            idx = plane_idx;
            check(path);
        };
        check_plane("portable plane kernel", [&](T* out, int64_t* i, const T* in) {
            detail::max_pool2x2_plane(out, i, in, H, W, P, Q);
        });
        if constexpr (std::is_same_v<T, float>)
            if (auto avx512 = detail::max_pool2x2_plane_avx512_if_supported())
                check_plane("AVX-512 plane kernel", [&](T* out, int64_t* i, const T* in) {
                    avx512(out, i, in, H, W, P, Q);
                });
    }
}

// Indices of `tiled` moved out of their windows: with `partial` some of ceil_mode's partial
// windows' (to a cell right of the last column, which is the first of the next row or the
// one below it; in the last row to the next window's cell or the cell before the window),
// else some of the whole windows' (to another window's cell). One pass cannot write their
// gradients.
std::vector<int64_t> stray_indices(const std::vector<int64_t>& tiled, int64_t planes, int64_t H,
                                   int64_t W, int64_t P, int64_t Q, bool partial) {
    std::vector<int64_t> idx = tiled;
    for (int64_t n = 0; n < planes; ++n)
        for (int64_t p = 0; p < P; ++p)
            for (int64_t q = 0; q < Q; ++q) {
                int64_t& at = idx[(n * P + p) * Q + q];
                const int64_t first = 2 * p * W + 2 * q;
                if (partial && (2 * p + 1 == H || 2 * q + 1 == W)) {
                    if ((p + q + n) % 2 != 0) continue;
                    // right of the last column; below the last row (outside the plane):
                    // the next window's first cell or the cell before the window instead
                    const int64_t moved = 2 * q + 1 == W ? first + (n % 2 == 0 ? 1 : W + 1)
                                          : q % 4 == 0   ? first + W
                                                         : first + 2;
                    at = moved < H * W ? moved : first > 0 ? first - 1 : at;
                } else if (!partial && 2 * p + 1 < H && 2 * q + 1 < W &&
                           (p * 7 + q * 3 + n) % 11 == 0) {
                    at = (first + 2 * W + 3) % (H * W);
                }
            }
    return idx;
}

// dx from indices of the 2x2 pool (written in one pass), from indices that leave their
// window (a 3x3 / stride 2 / padding 1 pool of the same output size, or stray_indices):
// the scatter.
template <typename T>
void check_backward_paths(unsigned seed) {
    const int64_t planes = 3;
    for (const auto& shape : pool2x2_shapes()) {
        const int64_t H = shape.H, W = shape.W, P = shape.P(), Q = shape.Q();
        const auto x = tricky_values<T>(planes * H * W, seed + unsigned(H * 131 + W));
        // NaN, infinities and -0 where each cell takes one gradient (0 + dy); finite values
        // where several may add up: which NaN a sum of NaN and infinities gives depends on the
        // order of the operands, which a compiler may swap
        const auto tricky_dy = tricky_values<T>(planes * P * Q, seed + 7 + unsigned(H * 131 + W));
        auto finite_dy = tricky_dy;
        for (auto& v : finite_dy)
            if (!std::isfinite(v)) v = T(2.5);
        std::vector<T> y(planes * P * Q);
        std::vector<int64_t> tiled(y.size()), overlapping(y.size());
        reference_pool2x2(y, tiled, x, planes, H, W, P, Q);
        overlapping = tiled;
        if (H >= 2 && W >= 2 && shape.uniform()) {
            const auto d3 =
                pool2d_dims("max_pool2d", {planes, 1, H, W},
                            cnnbp_test::with_options({3, 3, 2, 2, 1, 1}, 1, shape.ceil_h));
            if (d3.P == P && d3.Q == Q)
                max_pool2d_forward(y.data(), overlapping.data(), x.data(), d3);
        }
        auto stray = stray_indices(tiled, planes, H, W, P, Q, false),
             stray_partial = stray_indices(tiled, planes, H, W, P, Q, true);

        for (const auto* idx : {&tiled, &overlapping, &stray, &stray_partial}) {
            const std::string where =
                shape.where() + (idx == &tiled         ? " tiled"
                                 : idx == &overlapping ? " overlapping"
                                 : idx == &stray       ? " stray"
                                                       : " stray from partial windows");
            const auto& dy = idx == &tiled ? tricky_dy : finite_dy;
            const auto want = reference_unpool(dy, *idx, planes, H * W, P * Q);
            std::vector<T> dx(want.size(), T(7));  // garbage the kernels must overwrite
            const auto d =
                max_pool2d_backward_dims({planes, 1, P, Q}, {planes, 1, P, Q}, {planes, 1, H, W});
            max_pool2d_backward(dx.data(), dy.data(), idx->data(), d);
            if (!same_bits(dx, want))
                cnnbp_test::fail(__FILE__, __LINE__, "max_pool2d_backward differs at " + where);

            // the AVX-512 plane kernel either writes the scatter's bits or declines
            auto check_plane = [&](const char* path, auto kernel) {
                bool all = true;
                auto got = run_on_planes<T>(planes, H * W, path, [&](int64_t n, T* plane) {
                    const bool done = kernel(plane, dy.data() + n * P * Q, idx->data() + n * P * Q);
                    all = all && done;
                    if (!done)
                        std::copy(want.begin() + n * H * W, want.begin() + (n + 1) * H * W, plane);
                });
                if (!same_bits(got, want))
                    cnnbp_test::fail(__FILE__, __LINE__,
                                     std::string(path) + " differs at " + where);
                if (idx == &tiled && !all)
                    cnnbp_test::fail(__FILE__, __LINE__, std::string(path) + " declined " + where);
            };
            if constexpr (std::is_same_v<T, float>)
                if (auto avx512 = detail::max_unpool2x2_plane_avx512_if_supported())
                    check_plane("AVX-512 plane kernel", [&](T* out, const T* g, const int64_t* i) {
                        return avx512(out, g, i, H, W, P, Q);
                    });
        }
    }
}

// torch's avg-pool loops, written plainly: each window summed in row-major order over its
// in-bounds cells and divided by torch's divisor (divisor_override; else the window clipped
// to the padded input with count_include_pad, to the input without); the backward scatters
// dy / divisor window by window.
int64_t plain_divisor(const Pool2dDims& d, int64_t h0, int64_t w0) {
    const auto& p = d.params;
    if (p.divisor_override) return *p.divisor_override;
    const int64_t h1 = std::min(h0 + p.kernel_h, d.H + p.pad_h),
                  w1 = std::min(w0 + p.kernel_w, d.W + p.pad_w);
    if (p.count_include_pad) return (h1 - h0) * (w1 - w0);
    return (std::min(h1, d.H) - std::max<int64_t>(h0, 0)) *
           (std::min(w1, d.W) - std::max<int64_t>(w0, 0));
}

template <typename T>
void plain_avg_pool(std::vector<T>& y, const std::vector<T>& x, const Pool2dDims& d) {
    const auto& p = d.params;
    for (int64_t nc = 0; nc < d.N * d.C; ++nc)
        for (int64_t op = 0; op < d.P; ++op)
            for (int64_t oq = 0; oq < d.Q; ++oq) {
                const int64_t h0 = op * p.stride_h - p.pad_h, w0 = oq * p.stride_w - p.pad_w;
                T sum = 0;
                for (int64_t h = h0; h < h0 + p.kernel_h; ++h)
                    for (int64_t w = w0; w < w0 + p.kernel_w; ++w)
                        if (h >= 0 && h < d.H && w >= 0 && w < d.W)
                            sum += x[(nc * d.H + h) * d.W + w];
                y[(nc * d.P + op) * d.Q + oq] = sum / T(plain_divisor(d, h0, w0));
            }
}

template <typename T>
void plain_avg_unpool(std::vector<T>& dx, const std::vector<T>& dy, const Pool2dDims& d) {
    const auto& p = d.params;
    std::fill(dx.begin(), dx.end(), T(0));
    for (int64_t nc = 0; nc < d.N * d.C; ++nc)
        for (int64_t op = 0; op < d.P; ++op)
            for (int64_t oq = 0; oq < d.Q; ++oq) {
                const int64_t h0 = op * p.stride_h - p.pad_h, w0 = oq * p.stride_w - p.pad_w;
                const T g = dy[(nc * d.P + op) * d.Q + oq] / T(plain_divisor(d, h0, w0));
                for (int64_t h = h0; h < h0 + p.kernel_h; ++h)
                    for (int64_t w = w0; w < w0 + p.kernel_w; ++w)
                        if (h >= 0 && h < d.H && w >= 0 && w < d.W)
                            dx[(nc * d.H + h) * d.W + w] += g;
            }
}

// torch's max-pool loop, written plainly: the taps of each window dilation apart, the
// in-bounds ones in row-major order, `value > best || isnan(value)`.
template <typename T>
void plain_max_pool(std::vector<T>& y, std::vector<int64_t>& idx, const std::vector<T>& x,
                    const Pool2dDims& d) {
    const auto& p = d.params;
    for (int64_t nc = 0; nc < d.N * d.C; ++nc)
        for (int64_t op = 0; op < d.P; ++op)
            for (int64_t oq = 0; oq < d.Q; ++oq) {
                const int64_t h0 = op * p.stride_h - p.pad_h, w0 = oq * p.stride_w - p.pad_w;
                T best = -std::numeric_limits<T>::infinity();
                int64_t at = -1;
                for (int64_t i = 0; i < p.kernel_h; ++i)
                    for (int64_t j = 0; j < p.kernel_w; ++j) {
                        const int64_t h = h0 + i * p.dilation_h, w = w0 + j * p.dilation_w;
                        if (h < 0 || h >= d.H || w < 0 || w >= d.W) continue;
                        const T value = x[(nc * d.H + h) * d.W + w];
                        if (at < 0) at = h * d.W + w;  // the first in-bounds tap
                        if (value > best || std::isnan(value)) {
                            best = value;
                            at = h * d.W + w;
                        }
                    }
                y[(nc * d.P + op) * d.Q + oq] = best;
                idx[(nc * d.P + op) * d.Q + oq] = at;
            }
}

}  // namespace

TEST_CASE("max_pool2d 2x2 kernels match the rule bit for bit, ceil_mode too (float)") {
    check_forward_paths<float>(1);
}

TEST_CASE("max_pool2d 2x2 kernels match the rule bit for bit, ceil_mode too (double)") {
    check_forward_paths<double>(2);
}

TEST_CASE("max_pool2d 2x2 backward writes the scatter's bits or declines, ceil_mode too (float)") {
    check_backward_paths<float>(3);
}

TEST_CASE("max_pool2d 2x2 backward writes the scatter's bits or declines, ceil_mode too (double)") {
    check_backward_paths<double>(4);
}

// max_pool2d_forward against the plain loop on tricky values, bit for bit, indices too
template <typename T>
void check_max_pool_rule(const Pool2dDims& d, unsigned seed) {
    const auto x = tricky_values<T>(size_t(d.N * d.C * d.H * d.W), seed);
    std::vector<T> y(size_t(d.N * d.C * d.P * d.Q)), want_y(y.size());
    std::vector<int64_t> idx(y.size()), want_idx(y.size());
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    plain_max_pool(want_y, want_idx, x, d);
    CHECK(same_bits(y, want_y) && idx == want_idx);
}

TEST_CASE("max_pool2d 2x2 on many small planes (the chunk kernels) matches the rule bit for bit") {
    // floored pools of small even planes run 16 windows at a time across planes (AVX-512): a
    // batch of 37 planes leaves a remainder of planes for the plane kernels; 6x8 (12 windows
    // a plane), 4x32 (too wide), 32x6 and 16x12 (rows of 3 and 6 windows, which a chunk of 16
    // would split) take the plane kernels throughout
    const std::pair<int64_t, int64_t> sizes[] = {{2, 2},  {4, 4},  {8, 8},   {2, 8},  {4, 8},
                                                 {8, 4},  {2, 16}, {16, 16}, {32, 8}, {6, 8},
                                                 {4, 32}, {32, 6}, {16, 12}};
    const int64_t planes = 37;
    unsigned seed = 500;
    for (auto [H, W] : sizes) {
        const std::string where = std::to_string(H) + "x" + std::to_string(W);
        const int64_t P = H / 2, Q = W / 2;
        const auto x = tricky_values<float>(size_t(planes * H * W), seed++);
        std::vector<float> want_y(size_t(planes * P * Q)), y(want_y.size(), 7.0f);
        std::vector<int64_t> want_idx(want_y.size()), idx(want_y.size(), -7);
        reference_pool2x2(want_y, want_idx, x, planes, H, W, P, Q);
        const auto d = pool2d_dims("max_pool2d", {planes, 1, H, W}, {2, 2, 2, 2, 0, 0});
        max_pool2d_forward(y.data(), idx.data(), x.data(), d);
        if (!same_bits(y, want_y) || idx != want_idx)
            cnnbp_test::fail(__FILE__, __LINE__, "max_pool2d_forward differs at " + where);
        const int64_t whole_chunks = planes * P * Q / 16;
        const bool eligible = W <= 16 && 16 % Q == 0 && (16 % (P * Q) == 0 || (P * Q) % 16 == 0);
        auto forward = detail::max_pool2x2_chunks_avx512_if_supported();
        auto backward = detail::max_unpool2x2_chunks_avx512_if_supported();
        if (forward && eligible) {  // the kernel alone, on every whole chunk
            std::vector<float> chunk_y(y.size(), 7.0f);
            std::vector<int64_t> chunk_idx(idx.size(), -7);
            forward(chunk_y.data(), chunk_idx.data(), x.data(), H, W, 0, whole_chunks);
            const size_t n = size_t(whole_chunks * 16);
            CHECK(same_bits(std::vector<float>(chunk_y.begin(), chunk_y.begin() + n),
                            std::vector<float>(want_y.begin(), want_y.begin() + n)));
            CHECK(std::equal(chunk_idx.begin(), chunk_idx.begin() + n, want_idx.begin()));
            if (n < chunk_y.size()) CHECK(chunk_y[n] == 7.0f);  // nothing past its chunks
        }
        // the backward from the pool's own indices (one pass), from indices moved out of
        // their windows (the scatter), and the kernel alone on the pool's own
        const auto dy = tricky_values<float>(want_y.size(), seed++);
        const auto stray = stray_indices(want_idx, planes, H, W, P, Q, false);
        const std::vector<int64_t>* tiled = &want_idx;
        for (const std::vector<int64_t>* indices : {tiled, &stray}) {
            const auto want = reference_unpool(dy, *indices, planes, H * W, P * Q);
            std::vector<float> dx(want.size(), 7.0f);
            const auto db =
                max_pool2d_backward_dims({planes, 1, P, Q}, {planes, 1, P, Q}, {planes, 1, H, W});
            max_pool2d_backward(dx.data(), dy.data(), indices->data(), db);
            if (!same_bits(dx, want))
                cnnbp_test::fail(__FILE__, __LINE__,
                                 "max_pool2d_backward differs at " + where +
                                     (indices == &stray ? " stray" : " tiled"));
        }
        if (backward && eligible) {
            std::vector<float> dx(size_t(planes * H * W), 7.0f);
            CHECK(backward(dx.data(), dy.data(), want_idx.data(), H, W, 0, whole_chunks));
            const auto want = reference_unpool(dy, want_idx, planes, H * W, P * Q);
            const size_t n = size_t(whole_chunks * 64);
            CHECK(same_bits(std::vector<float>(dx.begin(), dx.begin() + n),
                            std::vector<float>(want.begin(), want.begin() + n)));
            // an index moved out of its window within the chunks: the kernel declines
            bool moved_out = false;
            for (int64_t w = 0; w < whole_chunks * 16; ++w) {
                const int64_t first = 2 * (w % (P * Q) / Q) * W + 2 * (w % Q);
                const int64_t offset = stray[size_t(w)] - first;
                moved_out =
                    moved_out || !(offset == 0 || offset == 1 || offset == W || offset == W + 1);
            }
            if (moved_out)
                CHECK(!backward(dx.data(), dy.data(), stray.data(), H, W, 0, whole_chunks));
        }
    }
}

TEST_CASE("max_pool2d ceil_mode: the 2x2 kernels and the partial windows match the rule") {
    // a ceil_mode 2x2 pool of an odd size: the 2x2 kernels, whose last row and column of
    // windows are clipped to the input, give the same bits and indices as the plain loop
    unsigned seed = 50;
    auto sizes = kSizes;
    sizes.insert(sizes.end(), kCeilOnlySizes.begin(), kCeilOnlySizes.end());
    for (auto [H, W] : sizes) {
        const auto d = pool2d_dims("max_pool2d", {3, 1, H, W},
                                   cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true));
        CHECK(d.P == (H + 1) / 2 && d.Q == (W + 1) / 2);
        check_max_pool_rule<float>(d, seed++);
        check_max_pool_rule<double>(d, seed++);
    }
}

TEST_CASE("max_pool2d with dilation and ceil_mode equals torch's loop bit for bit") {
    unsigned seed = 150;
    for (const auto& c : cnnbp_test::max_pool_option_cases()) {
        const auto d = pool2d_dims("max_pool2d", c.x, c.params);
        check_max_pool_rule<float>(d, seed++);
        check_max_pool_rule<double>(d, seed++);
    }
}

TEST_CASE("avg_pool2d equals torch's window-by-window loops bit for bit") {
    // the kernels reorder the loops for vectorization but keep each element's additions in
    // torch's order: the same bits as the plain loops, in float and double, for every option
    unsigned seed = 100;
    auto cases = cnnbp_test::pool_cases();
    const auto& options = cnnbp_test::avg_pool_option_cases();
    cases.insert(cases.end(), options.begin(), options.end());
    for (const auto& c : cases) {
        const auto d = pool2d_dims("avg_pool2d", c.x, c.params);
        const auto x64 = random_values(numel(c.x), seed++);
        const auto dy64 = random_values(d.N * d.C * d.P * d.Q, seed++);
        auto check = [&](auto tag) {
            using T = decltype(tag);
            const std::vector<T> x(x64.begin(), x64.end()), dy(dy64.begin(), dy64.end());
            std::vector<T> y(dy.size()), want_y(dy.size()), dx(x.size()), want_dx(x.size());
            avg_pool2d_forward(y.data(), x.data(), d);
            plain_avg_pool(want_y, x, d);
            CHECK(same_bits(y, want_y));
            avg_pool2d_backward(dx.data(), dy.data(), d);
            plain_avg_unpool(want_dx, dy, d);
            CHECK(same_bits(dx, want_dx));
        };
        check(float{});
        check(double{});
    }
}

TEST_CASE("avg_pool2d results do not depend on the thread count") {
    const Shape shape{8, 16, 24, 24};
    const auto d = pool2d_dims("avg_pool2d", shape, {3, 3, 2, 2, 1, 1});  // above the threshold
    const auto x = random_values<float>(numel(shape), 7);
    CHECK_THREAD_COUNT_INDEPENDENT([&]() {
        std::vector<float> y(d.N * d.C * d.P * d.Q), dx(x.size());
        avg_pool2d_forward(y.data(), x.data(), d);
        avg_pool2d_backward(dx.data(), y.data(), d);
        return std::vector<std::string>{bytes_of(y), bytes_of(dx)};
    });
}
