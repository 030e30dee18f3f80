// The pooling kernels' fast paths against plain loops written from the rule, bit for bit:
// the 2x2 / stride 2 max-pool kernels (portable and AVX-512) on ties, NaN, infinities, -0,
// and sizes that leave a remainder row, column or partial vector step; avg_pool2d's
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
// greater or NaN.
template <typename T>
void reference_pool2x2(std::vector<T>& y, std::vector<int64_t>& idx, const std::vector<T>& x,
                       int64_t planes, int64_t H, int64_t W) {
    const int64_t P = H / 2, Q = W / 2;
    for (int64_t n = 0; n < planes; ++n)
        for (int64_t p = 0; p < P; ++p)
            for (int64_t q = 0; q < Q; ++q) {
                T best = -std::numeric_limits<T>::infinity();
                int64_t at = 2 * p * W + 2 * q;
                for (int64_t h = 2 * p; h < 2 * p + 2; ++h)
                    for (int64_t w = 2 * q; w < 2 * q + 2; ++w) {
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

const std::vector<std::pair<int64_t, int64_t>> kSizes = {
    {2, 2},   {3, 3},   {4, 4},  {2, 5},  {5, 2},  {7, 9}, {26, 26},
    {32, 32}, {33, 35}, {4, 34}, {6, 63}, {3, 66}, {2, 97}};

template <typename T>
void check_forward_paths(unsigned seed) {
    const int64_t planes = 3;
    for (auto [H, W] : kSizes) {
        const std::string where = std::to_string(H) + "x" + std::to_string(W);
        const int64_t P = H / 2, Q = W / 2;
        const auto x = tricky_values<T>(planes * H * W, seed + unsigned(H * 131 + W));
        std::vector<T> want_y(planes * P * Q), y(want_y.size());
        std::vector<int64_t> want_idx(want_y.size()), idx(want_y.size());
        reference_pool2x2(want_y, want_idx, x, planes, H, W);

        auto check = [&](const char* path) {
            if (!same_bits(y, want_y) || idx != want_idx)
                cnnbp_test::fail(__FILE__, __LINE__, std::string(path) + " differs at " + where);
        };
        const auto d = pool2d_dims("max_pool2d", {planes, 1, H, W}, {2, 2, 2, 2, 0, 0});
        max_pool2d_forward(y.data(), idx.data(), x.data(), d);
        check("max_pool2d_forward");
        for (int64_t n = 0; n < planes; ++n)
            detail::max_pool2x2_plane(y.data() + n * P * Q, idx.data() + n * P * Q,
                                      x.data() + n * H * W, W, P, Q, Q);
        check("portable plane kernel");
        if constexpr (std::is_same_v<T, float>)
            if (auto avx512 = detail::max_pool2x2_plane_avx512_if_supported()) {
                for (int64_t n = 0; n < planes; ++n)
                    avx512(y.data() + n * P * Q, idx.data() + n * P * Q, x.data() + n * H * W, W, P,
                           Q, Q);
                check("AVX-512 plane kernel");
            }
    }
}

// dx from indices of the 2x2 pool (written in one pass) and from indices that leave their
// 2x2 window (a 3x3 / stride 2 / padding 1 pool has the same output size): the scatter.
template <typename T>
void check_backward_paths(unsigned seed) {
    const int64_t planes = 3;
    for (auto [H, W] : kSizes) {
        const int64_t P = H / 2, Q = W / 2;
        const auto x = tricky_values<T>(planes * H * W, seed + unsigned(H * 131 + W));
        auto dy = tricky_values<T>(planes * P * Q, seed + 7 + unsigned(H * 131 + W));
        std::vector<T> y(planes * P * Q);
        std::vector<int64_t> tiled(y.size()), overlapping(y.size());
        reference_pool2x2(y, tiled, x, planes, H, W);
        const auto d3 = pool2d_dims("max_pool2d", {planes, 1, H, W}, {3, 3, 2, 2, 1, 1});
        if (d3.P == P && d3.Q == Q)
            max_pool2d_forward(y.data(), overlapping.data(), x.data(), d3);
        else
            overlapping = tiled;

        for (const auto* idx : {&tiled, &overlapping}) {
            const std::string where = std::to_string(H) + "x" + std::to_string(W) +
                                      (idx == &tiled ? " tiled" : " overlapping");
            const auto want = reference_unpool(dy, *idx, planes, H * W, P * Q);
            std::vector<T> dx(want.size(), T(7));  // garbage the kernels must overwrite
            const auto d =
                max_pool2d_backward_dims({planes, 1, P, Q}, {planes, 1, P, Q}, {planes, 1, H, W});
            max_pool2d_backward(dx.data(), dy.data(), idx->data(), d);
            if (!same_bits(dx, want))
                cnnbp_test::fail(__FILE__, __LINE__, "max_pool2d_backward differs at " + where);

            // the plane kernels either write the scatter's bits or decline
            auto check_plane = [&](const char* path, auto kernel) {
                std::vector<T> got(want.size(), T(7));
                bool all = true;
                for (int64_t n = 0; n < planes; ++n) {
                    std::vector<T> plane(H * W, T(7));
                    const bool done =
                        kernel(plane.data(), dy.data() + n * P * Q, idx->data() + n * P * Q);
                    all = all && done;
                    if (done)
                        std::copy(plane.begin(), plane.end(), got.begin() + n * H * W);
                    else
                        std::copy(want.begin() + n * H * W, want.begin() + (n + 1) * H * W,
                                  got.begin() + n * H * W);
                }
                if (!same_bits(got, want))
                    cnnbp_test::fail(__FILE__, __LINE__,
                                     std::string(path) + " differs at " + where);
                if (idx == &tiled && !all)
                    cnnbp_test::fail(__FILE__, __LINE__, std::string(path) + " declined " + where);
            };
            check_plane("portable plane kernel", [&](T* out, const T* g, const int64_t* i) {
                return detail::max_unpool2x2_plane(out, g, i, H, W, P, Q);
            });
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

TEST_CASE("max_pool2d 2x2 kernels match the rule bit for bit (float)") {
    check_forward_paths<float>(1);
}

TEST_CASE("max_pool2d 2x2 kernels match the rule bit for bit (double)") {
    check_forward_paths<double>(2);
}

TEST_CASE("max_pool2d 2x2 backward writes the scatter's bits or declines (float)") {
    check_backward_paths<float>(3);
}

TEST_CASE("max_pool2d 2x2 backward writes the scatter's bits or declines (double)") {
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

TEST_CASE("max_pool2d ceil_mode: the 2x2 kernels and the partial windows match the rule") {
    // a ceil_mode 2x2 pool of an odd size: the 2x2 kernels for the whole windows, the edge
    // loops for the last row and column, the same bits and indices as the plain loop
    unsigned seed = 50;
    for (auto [H, W] : kSizes) {
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
