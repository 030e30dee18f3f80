// Kernels against small hand-computed answers and against central finite differences, and
// the elementwise kernels' results for one and two threads.
#include <array>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "../src/conv2d_paths.hpp"
#include "../src/gemm.hpp"
#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using cnnbp_test::bytes_of;
using cnnbp_test::dot;
using cnnbp_test::numeric_gradient;
using cnnbp_test::random_values;
using cnnbp_test::same_bits;
using V = std::vector<double>;

namespace {

// The gradient of J(x) = sum(forward(x) * g), by backward(dx, g, x), against central
// differences: forward(y, x) writes g.size() outputs and runs once before backward (which
// may read what it left, as dropout's mask).
template <typename Forward, typename Backward>
void check_finite_differences(V x, const V& g, Forward forward, Backward backward) {
    auto objective = [&]() {
        V y(g.size());
        forward(y.data(), x.data());
        return dot(y, g);
    };
    objective();
    V dx(x.size());
    backward(dx.data(), g.data(), x.data());
    CHECK_CLOSE(dx.data(), numeric_gradient(x, objective), 1e-9, 1e-6);
}

}  // namespace

// ---- conv2d ------------------------------------------------------------------------------

TEST_CASE("conv2d forward: 3x3 input, 2x2 filter, bias") {
    const V x{1, 2, 3, 4, 5, 6, 7, 8, 9}, w{1, 0, 0, -1}, b{0.5};
    const Shape bias_shape{1};
    const auto d = conv2d_dims({1, 1, 3, 3}, {1, 1, 2, 2}, &bias_shape, {});
    CHECK(d.P == 2 && d.Q == 2);
    std::vector<double> y(4);
    conv2d_forward(y.data(), x.data(), w.data(), b.data(), d);
    CHECK_CLOSE(y.data(), (V{-3.5, -3.5, -3.5, -3.5}), 0, 1e-15);
}

TEST_CASE("conv2d forward: zero padding and stride") {
    const V x{1, 2, 3, 4}, w{2};
    const auto padded = conv2d_dims({1, 1, 2, 2}, {1, 1, 1, 1}, nullptr, {1, 1, 1, 1});
    std::vector<double> y(16);
    conv2d_forward(y.data(), x.data(), w.data(), (const double*)nullptr, padded);
    CHECK_CLOSE(y.data(), (V{0, 0, 0, 0, 0, 2, 4, 0, 0, 6, 8, 0, 0, 0, 0, 0}), 0, 0);

    V x16(16);
    for (int i = 0; i < 16; ++i) x16[i] = i;
    const auto strided = conv2d_dims({1, 1, 4, 4}, {1, 1, 1, 1}, nullptr, {2, 2, 0, 0});
    std::vector<double> y4(4);
    const V one{1};
    conv2d_forward(y4.data(), x16.data(), one.data(), (const double*)nullptr, strided);
    CHECK_CLOSE(y4.data(), (V{0, 2, 8, 10}), 0, 0);
}

TEST_CASE("conv2d forward: channels sum, filters separate (float)") {
    const std::vector<float> x{1, 2, 3, 4, 5, 6, 7, 8};      // (1, 2, 2, 2)
    const std::vector<float> w{1, 1, 1, 1, 1,  1,  1,  1,    // filter 0: all ones
                               1, 1, 1, 1, -1, -1, -1, -1};  // filter 1: c0 - c1
    const auto d = conv2d_dims({1, 2, 2, 2}, {2, 2, 2, 2}, nullptr, {});
    std::vector<float> y(2);
    conv2d_forward(y.data(), x.data(), w.data(), (const float*)nullptr, d);
    CHECK_CLOSE(y.data(), (V{36, -16}), 0, 0);
}

TEST_CASE("conv2d backward: hand-computed dinput, dweight, dbias") {
    const V x{1, 2, 3, 4, 5, 6, 7, 8, 9}, w{1, 2, 3, 4}, dy{1, 1, 1, 1};
    const auto d = conv2d_dims({1, 1, 3, 3}, {1, 1, 2, 2}, nullptr, {});
    std::vector<double> dx(9), dw(4), db(1);
    conv2d_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
    // dW1 = valid cross-correlation of X with dL/dZ1: sums of the 2x2 blocks of x
    CHECK_CLOSE(dw.data(), (V{12, 16, 24, 28}), 0, 0);
    CHECK_CLOSE(db.data(), (V{4}), 0, 0);
    // dX = full convolution of dL/dZ1 with the rotated filter
    CHECK_CLOSE(dx.data(), (V{1, 3, 2, 4, 10, 6, 3, 7, 4}), 0, 0);
}

namespace {

// Every gradient of conv2d against central differences of J = sum(conv2d(x, w) * g).
void check_conv2d_finite_differences(const Shape& xs, const Shape& ws, const Conv2dParams& params) {
    const auto d = conv2d_dims(xs, ws, nullptr, params);
    V x = random_values(numel(xs), 1), w = random_values(numel(ws), 2);
    const V g = random_values(d.N * d.K * d.P * d.Q, 3);
    auto objective = [&]() {  // J = sum(conv2d(x, w) * g)
        V y(g.size());
        conv2d_forward(y.data(), x.data(), w.data(), (const double*)nullptr, d);
        return dot(y, g);
    };
    V dx(x.size()), dw(w.size()), db(d.K);
    conv2d_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), d);
    for (auto [values, grad] : {std::pair{&x, &dx}, std::pair{&w, &dw}})
        CHECK_CLOSE(grad->data(), numeric_gradient(*values, objective), 1e-8, 1e-6);
}

}  // namespace

TEST_CASE("conv2d backward: finite differences with stride and padding (direct loops)") {
    check_conv2d_finite_differences({2, 3, 5, 4}, {2, 3, 3, 2}, {2, 1, 1, 1});
}

TEST_CASE("conv2d backward: finite differences through the packed GEMM") {
    // K * P * Q * C * R * S = 6 * 5 * 8 * 45 per image: large enough for the GEMM path
    check_conv2d_finite_differences({2, 5, 9, 8}, {6, 5, 3, 3}, {2, 1, 1, 1});
    // unit strides and C >= 4 row panels: dinput runs as a forward convolution
    check_conv2d_finite_differences({1, 32, 5, 6}, {3, 32, 3, 3}, {1, 1, 1, 1});
    check_conv2d_finite_differences({1, 33, 4, 5}, {2, 33, 2, 3}, {1, 1, 0, 2});
    // unit strides and K >= the gather kernel's panel: dweight reads the image in place
    check_conv2d_finite_differences({2, 2, 5, 4}, {66, 2, 3, 2}, {1, 1, 1, 0});
}

TEST_CASE("conv2d paths: strided convolutions take the polyphase stack") {
    struct Case {
        Shape x, w;
        Conv2dParams p;
        std::array<std::string, 3> paths;  // without the forward_, dinput_, dweight_ prefixes
    };
    // {forward, dinput, dweight}; filters past the gather kernel's widest panel (66) or below
    // its narrowest (2) so that dweight's choice is the same on every instruction set
    const Case cases[] = {
        // a ResNet's strided stage: every path on the polyphase stack
        {{64, 16, 28, 28}, {32, 16, 3, 3}, {2, 2, 1, 1}, {"padded", "polyphase", "padded"}},
        // stride (2, 1) and (1, 2) mixes, dilation, groups, stride 3 with a 5x5 filter
        {{2, 6, 11, 9}, {2, 6, 3, 3}, {2, 1, 1, 0}, {"padded", "polyphase", "gemm_dot"}},
        {{2, 8, 9, 13}, {66, 8, 2, 3}, {1, 2, 0, 2}, {"padded", "polyphase", "padded"}},
        {{2, 8, 15, 12}, {66, 8, 3, 3}, {2, 2, 1, 1, 2, 1}, {"padded", "polyphase", "padded"}},
        {{2, 16, 13, 9}, {132, 8, 3, 3}, {2, 2, 2, 1, 1, 1, 2}, {"padded", "polyphase", "padded"}},
        {{2, 8, 17, 17}, {66, 8, 5, 5}, {3, 3, 2, 2}, {"padded", "polyphase", "padded"}},
        // a 2x2 filter spans stride 3 only with its dilation 2
        {{2, 8, 13, 13}, {66, 8, 2, 2}, {3, 3, 1, 1, 2, 2}, {"padded", "polyphase", "padded"}},
        // fewer than 4 input channels: dinput through col2im
        {{64, 3, 56, 56}, {64, 3, 7, 7}, {2, 2, 3, 3}, {"padded", "gemm_col2im", "padded"}},
        // the filter does not span the stride (a 1x1 shortcut, stride 2; a 2-wide filter with
        // stride 3 across): im2col throughout
        {{64, 64, 28, 28}, {128, 64, 1, 1}, {2, 2}, {"gemm", "gemm_col2im", "gemm_dot"}},
        {{2, 8, 12, 12}, {66, 8, 3, 2}, {2, 3, 1, 0}, {"gemm", "gemm_col2im", "gemm_dot"}},
        // unit strides keep their paths; tiny problems and depthwise ones theirs
        {{2, 8, 9, 9}, {66, 8, 3, 3}, {1, 1, 1, 1}, {"padded", "as_forward", "padded"}},
        {{1, 1, 6, 6}, {1, 1, 3, 3}, {2, 2, 1, 1}, {"direct", "direct", "direct"}},
        {{2, 8, 12, 12},
         {8, 1, 3, 3},
         {2, 2, 1, 1, 1, 1, 8},
         {"depthwise", "depthwise", "depthwise"}},
    };
    for (const auto& c : cases) {
        const auto names = detail::conv2d_path_names(conv2d_dims(c.x, c.w, nullptr, c.p));
        CHECK(std::string(names[0]) == "forward_" + c.paths[0]);
        CHECK(std::string(names[1]) == "dinput_" + c.paths[1]);
        CHECK(std::string(names[2]) == "dweight_" + c.paths[2]);
    }
}

namespace {

// A convolution and the forward path the plan must choose for it.
struct ForwardPathCase {
    Shape x, w;
    Conv2dParams p;
    const char* forward;
};

// The case's dims, having checked that its forward takes the path it names.
Conv2dDims dims_on_path(const ForwardPathCase& c) {
    const auto d = conv2d_dims(c.x, c.w, nullptr, c.p);
    CHECK(std::string(detail::conv2d_path_names(d)[0]) == c.forward);
    return d;
}

}  // namespace

TEST_CASE("conv2d: batches smaller than the thread count give the same bits") {
    // one to three images, on every forward path: the threads split the padded grid's bands
    // of rows or the im2col GEMM's columns instead of the batch above the split's threshold
    const ForwardPathCase cases[] = {
        {{1, 3, 50, 50}, {16, 3, 3, 3}, {1, 1, 1, 1}, "forward_padded"},            // unit stride
        {{2, 16, 24, 24}, {32, 16, 3, 3}, {2, 2, 1, 1}, "forward_padded"},          // polyphase
        {{3, 8, 20, 20}, {16, 8, 3, 3}, {1, 1, 2, 2, 2, 2}, "forward_padded"},      // dilation
        {{1, 16, 24, 24}, {32, 8, 3, 3}, {1, 1, 1, 1, 1, 1, 2}, "forward_padded"},  // groups
        {{1, 64, 40, 40}, {128, 64, 1, 1}, {2, 2}, "forward_gemm"},                 // 1x1 stride 2
        {{1, 32, 32, 32}, {32, 1, 3, 3}, {2, 2, 1, 1, 1, 1, 32}, "forward_depthwise"},
        // above the split's 4M multiply-adds: the threads take bands of the grid's rows
        {{1, 16, 64, 61}, {32, 16, 3, 3}, {1, 1, 1, 1}, "forward_padded"},
        {{2, 8, 90, 70}, {16, 8, 3, 3}, {1, 1, 1, 1}, "forward_padded"},  // 3 or 4 threads
        {{1, 16, 80, 79}, {32, 16, 3, 3}, {2, 2, 1, 1}, "forward_padded"},
        {{1, 8, 70, 70}, {34, 8, 3, 3}, {1, 1, 2, 2, 2, 2}, "forward_padded"},
        {{1, 3, 150, 150}, {64, 3, 3, 3}, {1, 1, 1, 1}, "forward_padded"},
        // a grid past kMaxWholeGridValues: bands on one thread too
        {{2, 2, 200, 190}, {64, 2, 3, 3}, {1, 1, 1, 1}, "forward_padded"},
    };
    unsigned seed = 70;
    for (const auto& c : cases) {
        const auto d = dims_on_path(c);
        const std::vector<float> x = random_values<float>(numel(c.x), seed++),
                                 w = random_values<float>(numel(c.w), seed++),
                                 b = random_values<float>(d.K, seed++),
                                 dy = random_values<float>(d.N * d.K * d.P * d.Q, seed++);
        CHECK_THREAD_COUNT_INDEPENDENT([&]() {
            std::vector<float> y(dy.size()), dx(x.size()), dw(w.size()), db(d.K);
            conv2d_forward(y.data(), x.data(), w.data(), b.data(), d);
            conv2d_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
            return std::vector<std::string>{bytes_of(y), bytes_of(dx), bytes_of(dw), bytes_of(db)};
        });
    }
}

TEST_CASE("conv2d: small planes side by side give each image's bits alone") {
    // batches of small planes run with several images side by side on one padded stack (the
    // forward, and dinput as a forward); every image's output and dinput must be the bits of
    // that image convolved alone. Odd batches leave a short last stack.
    struct Case {
        Shape x, w;
        Conv2dParams p;
    };
    Conv2dParams same;
    same.same_padding = true;
    Conv2dParams dilated{1, 1, 2, 1, 2, 1};
    const Case cases[] = {
        {{64, 32, 4, 4}, {64, 32, 3, 3}, {1, 1, 1, 1}},  // the CLI network's second conv
        {{19, 1, 8, 8}, {32, 1, 3, 3}, {1, 1, 1, 1}},    // its first, a short last stack
        {{9, 5, 6, 3}, {70, 5, 3, 2}, {1, 1, 1, 0}},     // partial panels, no column padding
        {{12, 6, 5, 7}, {3, 6, 2, 4}, same},             // 'same' with more padding right
        {{10, 8, 7, 6}, {16, 8, 3, 3}, dilated},         // dilation
        {{12, 8, 5, 5}, {16, 8, 1, 1}, {1, 1, 1, 1}},    // padding past the filter: outputs
                                                         // of neighbours share columns
    };
    unsigned seed = 90;
    for (const auto& c : cases) {
        const auto d = conv2d_dims(c.x, c.w, nullptr, c.p);
        CHECK(std::string(detail::conv2d_path_names(d)[0]) == "forward_padded");
        CHECK(detail::conv2d_images_side_by_side(d) > 1);
        const std::vector<float> x = random_values<float>(numel(c.x), seed++),
                                 w = random_values<float>(numel(c.w), seed++),
                                 b = random_values<float>(d.K, seed++),
                                 dy = random_values<float>(d.N * d.K * d.P * d.Q, seed++);
        std::vector<float> y(dy.size()), dx(x.size());
        conv2d_forward(y.data(), x.data(), w.data(), b.data(), d);
        conv2d_backward(dx.data(), (float*)nullptr, (float*)nullptr, dy.data(), x.data(), w.data(),
                        d);
        Shape one = c.x;
        one[0] = 1;
        const auto d1 = conv2d_dims(one, c.w, nullptr, c.p);
        const int64_t CHW = d.C * d.H * d.W, KPQ = d.K * d.P * d.Q;
        for (int64_t n = 0; n < d.N; ++n) {
            std::vector<float> y1(static_cast<size_t>(KPQ)), dx1(static_cast<size_t>(CHW));
            conv2d_forward(y1.data(), x.data() + n * CHW, w.data(), b.data(), d1);
            conv2d_backward(dx1.data(), (float*)nullptr, (float*)nullptr, dy.data() + n * KPQ,
                            x.data() + n * CHW, w.data(), d1);
            CHECK(bytes_of(y1) ==
                  bytes_of(std::vector<float>(y.begin() + n * KPQ, y.begin() + (n + 1) * KPQ)));
            CHECK(bytes_of(dx1) ==
                  bytes_of(std::vector<float>(dx.begin() + n * CHW, dx.begin() + (n + 1) * CHW)));
        }
    }
}

TEST_CASE("conv2d backward: finite differences on the polyphase stack") {
    // odd sizes, stride mixes, dilation, groups, a phase stride of 3, partial panels; small
    // enough that the differences' rounding stays below the tolerance
    check_conv2d_finite_differences({2, 5, 9, 7}, {6, 5, 3, 3}, {2, 2, 1, 1});
    check_conv2d_finite_differences({1, 4, 7, 6}, {5, 4, 3, 2}, {2, 1, 1, 0});
    check_conv2d_finite_differences({1, 4, 5, 9}, {5, 4, 2, 3}, {1, 2, 0, 2});
    check_conv2d_finite_differences({1, 4, 9, 7}, {5, 4, 3, 3}, {2, 2, 1, 1, 2, 1});
    check_conv2d_finite_differences({1, 8, 9, 7}, {6, 4, 3, 3}, {2, 2, 2, 1, 1, 1, 2});
    check_conv2d_finite_differences({1, 4, 11, 11}, {5, 4, 5, 5}, {3, 3, 2, 2});
    check_conv2d_finite_differences({1, 4, 9, 8}, {5, 4, 2, 2}, {3, 3, 1, 1, 2, 2});
    // filters past the gather kernel's panel: dweight on the stack
    check_conv2d_finite_differences({1, 2, 7, 6}, {66, 2, 3, 3}, {2, 2, 1, 1});
}

TEST_CASE("conv2d float paths agree with double on every shape family") {
    // unit and non-unit strides, narrow and wide channel counts: every kernel path
    struct Case {
        Shape x, w;
        Conv2dParams p;
    };
    const Case cases[] = {
        {{3, 1, 12, 11}, {8, 1, 3, 3}, {1, 1, 0, 0}},   // one input channel
        {{2, 8, 9, 9}, {16, 8, 3, 3}, {1, 1, 1, 1}},    // middle widths
        {{2, 5, 7, 8}, {70, 5, 3, 2}, {1, 1, 1, 0}},    // many filters, partial panels
        {{2, 34, 6, 6}, {3, 34, 3, 3}, {1, 1, 1, 1}},   // many channels, few filters
        {{2, 6, 11, 9}, {10, 6, 3, 3}, {2, 1, 1, 0}},   // strided: the polyphase stack
        {{2, 30, 9, 9}, {9, 30, 3, 3}, {2, 2, 1, 1}},   // strided, two k-blocks
        {{2, 8, 10, 10}, {12, 8, 1, 1}, {2, 2, 0, 0}},  // 1x1 strided: im2col GEMM, col2im
    };
    unsigned seed = 10;
    for (const auto& c : cases) {
        const auto d = conv2d_dims(c.x, c.w, nullptr, c.p);
        const V x = random_values(numel(c.x), seed++), w = random_values(numel(c.w), seed++),
                b = random_values(d.K, seed++), dy = random_values(d.N * d.K * d.P * d.Q, seed++);
        V y(dy.size()), dx(x.size()), dw(w.size()), db(d.K);
        conv2d_forward(y.data(), x.data(), w.data(), b.data(), d);
        conv2d_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
        auto f = [](const V& v) { return std::vector<float>(v.begin(), v.end()); };
        const auto xf = f(x), wf = f(w), bf = f(b), dyf = f(dy);
        std::vector<float> yf(y.size()), dxf(dx.size()), dwf(dw.size()), dbf(db.size());
        conv2d_forward(yf.data(), xf.data(), wf.data(), bf.data(), d);
        conv2d_backward(dxf.data(), dwf.data(), dbf.data(), dyf.data(), xf.data(), wf.data(), d);
        // float sums of up to a few thousand unit-sized terms: 1e-4 absolute is ~100 ulps
        CHECK_CLOSE(yf.data(), y, 1e-4, 1e-5);
        CHECK_CLOSE(dxf.data(), dx, 1e-4, 1e-5);
        CHECK_CLOSE(dwf.data(), dw, 1e-3, 1e-5);
        CHECK_CLOSE(dbf.data(), db, 1e-3, 1e-5);
    }
}

// ---- max_pool2d --------------------------------------------------------------------------

TEST_CASE("max_pool2d forward and backward: 2x2 windows") {
    const V x{1, 3, 2, 4, 5, 7, 6, 8, 9, 11, 10, 12, 13, 15, 14, 16};
    const auto d = pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
    V y(4);
    std::vector<int64_t> idx(4);
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    CHECK_CLOSE(y.data(), (V{7, 8, 15, 16}), 0, 0);
    CHECK((idx == std::vector<int64_t>{5, 7, 13, 15}));
    const V dy{1, 2, 3, 4};
    V dx(16);
    max_pool2d_backward(dx.data(), dy.data(), idx.data(), d);
    CHECK_CLOSE(dx.data(), (V{0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 3, 0, 4}), 0, 0);
}

TEST_CASE("max_pool2d ties pick the first cell, NaN propagates (last NaN wins)") {
    const V zeros(16, 0.0);
    const auto d = pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
    V y(4);
    std::vector<int64_t> idx(4);
    max_pool2d_forward(y.data(), idx.data(), zeros.data(), d);
    CHECK((idx == std::vector<int64_t>{0, 2, 8, 10}));

    const double nan = std::numeric_limits<double>::quiet_NaN();
    const V x{1, nan, 3, nan};  // one 2x2 window
    const auto one = pool2d_dims("max_pool2d", {1, 1, 2, 2}, {2, 2, 2, 2, 0, 0});
    max_pool2d_forward(y.data(), idx.data(), x.data(), one);
    CHECK(std::isnan(y[0]));
    CHECK(idx[0] == 3);
}

TEST_CASE("max_pool2d padding is -inf and never chosen") {
    const double inf = std::numeric_limits<double>::infinity();
    const V x{-inf, -inf, -inf, -inf};
    const auto d = pool2d_dims("max_pool2d", {1, 1, 2, 2}, {2, 2, 1, 1, 1, 1});
    CHECK(d.P == 3 && d.Q == 3);
    V y(9);
    std::vector<int64_t> idx(9);
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    for (double v : y) CHECK(v == -inf);
    // each window reports its first in-bounds cell
    CHECK((idx == std::vector<int64_t>{0, 0, 1, 0, 0, 1, 2, 2, 3}));
}

TEST_CASE("max_pool2d backward adds where overlapping windows pick the same cell") {
    const V x{0, 0, 0, 0, 9, 0};  // (1, 1, 1, 6)... as a 2x3 plane
    const auto d = pool2d_dims("max_pool2d", {1, 1, 2, 3}, {2, 2, 1, 1, 0, 0});
    V y(2), dx(6);
    std::vector<int64_t> idx(2);
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    CHECK((idx == std::vector<int64_t>{4, 4}));
    const V dy{1.5, 2.5};
    max_pool2d_backward(dx.data(), dy.data(), idx.data(), d);
    CHECK_CLOSE(dx.data(), (V{0, 0, 0, 0, 4, 0}), 0, 0);
}

// ---- avg_pool2d --------------------------------------------------------------------------

TEST_CASE("avg_pool2d forward and backward: 2x2 windows") {
    V x(16);
    for (int i = 0; i < 16; ++i) x[i] = i;
    const auto d = pool2d_dims("avg_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
    CHECK(d.P == 2 && d.Q == 2);
    V y(4), dx(16);
    avg_pool2d_forward(y.data(), x.data(), d);
    CHECK_CLOSE(y.data(), (V{2.5, 4.5, 10.5, 12.5}), 0, 0);
    const V dy{4, 8, 12, 16};
    avg_pool2d_backward(dx.data(), dy.data(), d);
    CHECK_CLOSE(dx.data(), (V{1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4}), 0, 0);
}

TEST_CASE("avg_pool2d padding counts in the divisor, its gradient is dropped") {
    const std::vector<float> x(4, 1.0f);
    const auto d = pool2d_dims("avg_pool2d", {1, 1, 2, 2}, {2, 2, 1, 1, 1, 1});
    CHECK(d.P == 3 && d.Q == 3);
    std::vector<float> y(9), dx(4);
    avg_pool2d_forward(y.data(), x.data(), d);
    CHECK_CLOSE(y.data(), (V{0.25, 0.5, 0.25, 0.5, 1, 0.5, 0.25, 0.5, 0.25}), 0, 0);
    const std::vector<float> dy(9, 1.0f);
    avg_pool2d_backward(dx.data(), dy.data(), d);
    CHECK_CLOSE(dx.data(), (V{1, 1, 1, 1}), 0, 0);  // each cell in four windows of 1/4
}

TEST_CASE("avg_pool2d backward adds overlapping windows, zero where no window reads") {
    // kernel 3, stride 2 on 5x5: the center is in all four windows
    const auto d = pool2d_dims("avg_pool2d", {1, 1, 5, 5}, {3, 3, 2, 2, 0, 0});
    const V dy{9, 18, 27, 36};
    V dx(25);
    avg_pool2d_backward(dx.data(), dy.data(), d);
    CHECK(dx[12] == 10 && dx[0] == 1 && dx[2] == 3 && dx[24] == 4);
    // kernel 2, stride 3 on 5 columns: column 2 is in no window
    const auto gap = pool2d_dims("avg_pool2d", {1, 1, 2, 5}, {2, 2, 1, 3, 0, 0});
    const V ones{1, 1};
    V dgap(10);
    avg_pool2d_backward(dgap.data(), ones.data(), gap);
    CHECK_CLOSE(dgap.data(), (V{0.25, 0.25, 0, 0.25, 0.25, 0.25, 0.25, 0, 0.25, 0.25}), 0, 0);
}

TEST_CASE("max_pool2d dilation and ceil_mode: taps apart, partial last windows") {
    const V x{1, 2, 3, 4, 5, 6, 7, 8, 9};  // a 3x3 plane
    // ceil_mode 2x2 / stride 2: a last row and column of windows hanging past the input
    const auto ceil = pool2d_dims("max_pool2d", {1, 1, 3, 3},
                                  cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true));
    CHECK(ceil.P == 2 && ceil.Q == 2);
    V y(4);
    std::vector<int64_t> idx(4);
    max_pool2d_forward(y.data(), idx.data(), x.data(), ceil);
    CHECK_CLOSE(y.data(), (V{5, 6, 8, 9}), 0, 0);
    CHECK((idx == std::vector<int64_t>{4, 5, 7, 8}));
    // 2x2 taps 2 apart: the corners (0, 0), (0, 2), (2, 0), (2, 2)
    const auto dilated = pool2d_dims("max_pool2d", {1, 1, 3, 3},
                                     cnnbp_test::with_options({2, 2, 1, 1, 0, 0}, 2, false));
    CHECK(dilated.P == 1 && dilated.Q == 1);
    const V corners{1, 20, 3, 40, 50, 60, 7, 80, 9};  // the middle cells larger, never seen
    max_pool2d_forward(y.data(), idx.data(), corners.data(), dilated);
    CHECK(y[0] == 9 && idx[0] == 8);
    // torch drops a ceil_mode window that would start in the right padding: 5 rows, kernel
    // 2, stride 2, padding 1 give 3 windows, not 4
    const auto dropped = pool2d_dims("max_pool2d", {1, 1, 5, 5},
                                     cnnbp_test::with_options({2, 2, 2, 2, 1, 1}, 1, true));
    CHECK(dropped.P == 3 && dropped.Q == 3);
}

TEST_CASE("avg_pool2d ceil_mode, count_include_pad and divisor_override: torch's divisors") {
    const V x{1, 2, 3, 4, 5, 6, 7, 8, 9};  // a 3x3 plane
    V y(4);
    // ceil_mode 2x2 / stride 2: the last windows count only the cells up to the padded
    // input's end (no padding here: the input's)
    const auto ceil = pool2d_dims("avg_pool2d", {1, 1, 3, 3},
                                  cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true));
    avg_pool2d_forward(y.data(), x.data(), ceil);
    CHECK_CLOSE(y.data(), (V{3, 4.5, 7.5, 9}), 0, 0);
    // padding 1, kernel 3, stride 2, count_include_pad: window (0, 0) holds 4 cells of the
    // input in 9; without count_include_pad it divides by 4
    const auto padded = pool2d_dims("avg_pool2d", {1, 1, 3, 3},
                                    cnnbp_test::with_options({3, 3, 2, 2, 1, 1}, 1, false));
    avg_pool2d_forward(y.data(), x.data(), padded);
    CHECK_CLOSE(y[0], 12.0 / 9, 1e-15, 0);
    const auto in_input = pool2d_dims(
        "avg_pool2d", {1, 1, 3, 3}, cnnbp_test::with_options({3, 3, 2, 2, 1, 1}, 1, false, false));
    avg_pool2d_forward(y.data(), x.data(), in_input);
    CHECK_CLOSE(y.data(), (V{3, 4, 6, 7}), 1e-15, 0);
    // divisor_override replaces the divisor, in the backward too
    const auto override =
        pool2d_dims("avg_pool2d", {1, 1, 3, 3},
                    cnnbp_test::with_options({2, 2, 1, 1, 0, 0}, 1, false, true, -2));
    avg_pool2d_forward(y.data(), x.data(), override);
    CHECK_CLOSE(y.data(), (V{-6, -8, -12, -14}), 0, 0);
    V dx(9);
    const V ones{1, 1, 1, 1};
    avg_pool2d_backward(dx.data(), ones.data(), override);
    CHECK_CLOSE(dx.data(), (V{-0.5, -1, -0.5, -1, -2, -1, -0.5, -1, -0.5}), 0, 0);
}

TEST_CASE("avg_pool2d backward: finite differences") {
    unsigned seed = 1;
    auto cases = cnnbp_test::pool_cases();
    for (const auto& c : cnnbp_test::avg_pool_option_cases())
        if (numel(c.x) <= 1000) cases.push_back(c);  // the small ones: differences of sums
    for (const auto& c : cases) {
        const auto d = pool2d_dims("avg_pool2d", c.x, c.params);
        const V x = random_values(numel(c.x), seed++);
        check_finite_differences(
            x, random_values(d.N * d.C * d.P * d.Q, seed++),
            [&](double* y, const double* in) { avg_pool2d_forward(y, in, d); },
            [&](double* dx, const double* g, const double*) { avg_pool2d_backward(dx, g, d); });
    }
}

// ---- adaptive_avg_pool2d -------------------------------------------------------------------

TEST_CASE("adaptive_avg_pool2d: torch's windows, hand-computed forward and backward") {
    // x[h][w] = 4h + w (3 x 4) to (2, 3): rows [0, 2) and [1, 3), columns [0, 2), [1, 3) and
    // [2, 4): every window 2 x 2, its mean 4 * (mean row) + (mean column)
    V x(12);
    for (int i = 0; i < 12; ++i) x[size_t(i)] = i;
    const auto d = adaptive_pool2d_dims("adaptive_avg_pool2d", {1, 1, 3, 4}, {2, 3});
    CHECK(d.P == 2 && d.Q == 3 && d.batched);
    V y(6);
    adaptive_avg_pool2d_forward(y.data(), x.data(), d);
    CHECK_CLOSE(y.data(), (V{2.5, 3.5, 4.5, 6.5, 7.5, 8.5}), 0, 0);
    // each window gives its cells 1/4 of dy: shared rows and columns add up
    const V ones(6, 1.0);
    V dx(12);
    adaptive_avg_pool2d_backward(dx.data(), ones.data(), d);
    CHECK_CLOSE(dx.data(), (V{.25, .5, .5, .25, .5, 1, 1, .5, .25, .5, .5, .25}), 0, 0);
    // random values against central differences
    const V g = random_values(6, 31);
    check_finite_differences(
        random_values(12, 32), g,
        [&](double* out, const double* in) { adaptive_avg_pool2d_forward(out, in, d); },
        [&](double* din, const double* dout, const double*) {
            adaptive_avg_pool2d_backward(din, dout, d);
        });
}

TEST_CASE("adaptive_avg_pool2d: output larger than the input, None, the global pool") {
    // 2 rows to 3: windows [0, 1), [0, 2), [1, 2); None keeps the single column
    const V x{1, 3};
    const auto up = adaptive_pool2d_dims("adaptive_avg_pool2d", {1, 2, 1}, {3, std::nullopt});
    CHECK(!up.batched && up.N == 1 && up.P == 3 && up.Q == 1);
    CHECK(adaptive_pool2d_output_shape(up) == (Shape{1, 3, 1}));
    V y(3), dx(2);
    adaptive_avg_pool2d_forward(y.data(), x.data(), up);
    CHECK_CLOSE(y.data(), (V{1, 2, 3}), 0, 0);
    const V dy{1, 1, 1};
    adaptive_avg_pool2d_backward(dx.data(), dy.data(), up);
    CHECK_CLOSE(dx.data(), (V{1.5, 1.5}), 0, 0);

    // output_size 1: the mean of each plane; backward spreads dy / (H * W)
    const std::vector<float> planes{1, 2, 3, 4, 5, 6, 7, 8}, dglobal{4, 8};
    const auto global = adaptive_pool2d_dims("adaptive_avg_pool2d", {2, 1, 2, 2}, {1, 1});
    std::vector<float> mean(2), dplanes(8);
    adaptive_avg_pool2d_forward(mean.data(), planes.data(), global);
    CHECK_CLOSE(mean.data(), (V{2.5, 6.5}), 0, 0);
    adaptive_avg_pool2d_backward(dplanes.data(), dglobal.data(), global);
    CHECK_CLOSE(dplanes.data(), (V{1, 1, 1, 1, 2, 2, 2, 2}), 0, 0);

    // an empty batch passes and writes nothing
    const auto empty = adaptive_pool2d_dims("adaptive_avg_pool2d", {0, 3, 5, 5}, {2, 2});
    CHECK(adaptive_pool2d_output_shape(empty) == (Shape{0, 3, 2, 2}));
    adaptive_avg_pool2d_forward<double>(nullptr, nullptr, empty);
    adaptive_avg_pool2d_backward<double>(nullptr, nullptr, empty);
}

TEST_CASE("adaptive_avg_pool2d: refusals name the op, what was expected and what came") {
    CHECK_THROWS(adaptive_pool2d_dims("adaptive_avg_pool2d", {1, 1, 4, 4}, {0, 2}),
                 "[adaptive_avg_pool2d] output_size: expected sizes >= 1 or None, got (0, 2)");
    CHECK_THROWS(adaptive_pool2d_dims("adaptive_avg_pool2d", {1, 1, 4, 4}, {std::nullopt, -1}),
                 "[adaptive_avg_pool2d] output_size: expected sizes >= 1 or None, got (None, -1)");
    CHECK_THROWS(adaptive_pool2d_dims("adaptive_avg_pool2d", {4, 4}, {2, 2}),
                 "[adaptive_avg_pool2d] input: expected 3 dims (C, H, W) or 4 dims");
    CHECK_THROWS(adaptive_avg_pool2d_backward_dims({1, 1, 2, 1}, {1, 1, 4, 4}, {2, 2}),
                 "[adaptive_avg_pool2d_backward] doutput: expected shape (1, 1, 2, 2) (the "
                 "forward output's), got shape (1, 1, 2, 1)");
}

// ---- activations -------------------------------------------------------------------------

TEST_CASE("activation relu: forward keeps NaN, backward zero at z <= 0") {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const V z{-1, 0, 2, nan}, da{1, 1, 1, 1};
    V a(4), dz(4);
    relu_forward(a.data(), z.data(), 4);
    CHECK(a[0] == 0 && a[1] == 0 && a[2] == 2 && std::isnan(a[3]));
    relu_backward(dz.data(), da.data(), z.data(), 4);
    CHECK_CLOSE(dz.data(), (V{0, 0, 1, 1}), 0, 0);
}

TEST_CASE("activation sigmoid: forward and backward") {
    const std::vector<float> z{0, 100, -100}, da{1, 1, 1};
    std::vector<float> a(3), dz(3);
    sigmoid_forward(a.data(), z.data(), 3);
    CHECK_CLOSE(a.data(), (V{0.5, 1, 0}), 1e-30, 1e-7);
    sigmoid_backward(dz.data(), da.data(), a.data(), 3);
    CHECK_CLOSE(dz.data(), (V{0.25, 0, 0}), 1e-30, 1e-7);
}

TEST_CASE("activation tanh: forward saturates without overflow, backward from the output") {
    const double inf = std::numeric_limits<double>::infinity();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const V z{0, 0.5, -0.5, 30, -30, 1e300, -inf, nan};
    V a(z.size()), dz(z.size());
    tanh_forward(a.data(), z.data(), int64_t(z.size()));
    CHECK_CLOSE(a.data(), (V{0, std::tanh(0.5), -std::tanh(0.5), 1, -1, 1, -1}), 0, 1e-15);
    CHECK(std::isnan(a[7]));
    const V da(z.size(), 2.0);
    tanh_backward(dz.data(), da.data(), a.data(), int64_t(z.size()));
    const double t = std::tanh(0.5);
    CHECK_CLOSE(dz.data(), (V{2, 2 * (1 - t * t), 2 * (1 - t * t), 0, 0, 0, 0}), 0, 1e-15);

    const std::vector<float> zf{0.25f, 1e30f, -100.0f};
    std::vector<float> af(3);
    tanh_forward(af.data(), zf.data(), 3);
    CHECK_CLOSE(af.data(), (V{std::tanh(0.25), 1, -1}), 0, 6e-8);  // half a float ulp
}

TEST_CASE("activation tanh backward: finite differences") {
    V z = random_values(40, 11);
    for (auto& v : z) v *= 3;
    const auto n = int64_t(z.size());
    check_finite_differences(
        z, random_values(z.size(), 12),
        [&](double* a, const double* in) { tanh_forward(a, in, n); },
        [&](double* dz, const double* g, const double* in) {
            V a(z.size());
            tanh_forward(a.data(), in, n);
            tanh_backward(dz, g, a.data(), n);
        });
}

TEST_CASE("activation leaky_relu: the slope below zero, NaN kept, the slope's side at z = 0") {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const V z{-2, 0, 3, nan, -0.5}, da{1, 1, 1, 1, 4};
    V a(5), dz(5);
    leaky_relu_forward(a.data(), z.data(), 5, 0.25);
    CHECK(a[0] == -0.5 && a[1] == 0 && a[2] == 3 && std::isnan(a[3]) && a[4] == -0.125);
    leaky_relu_backward(dz.data(), da.data(), z.data(), 5, 0.25);
    CHECK_CLOSE(dz.data(), (V{0.25, 0.25, 1, 0.25, 1}), 0, 0);
    leaky_relu_forward(a.data(), z.data(), 5, -1.5);  // any finite slope
    CHECK(a[0] == 3 && a[4] == 0.75);
    // float: the slope rounded to float once, then one float product (torch's operations)
    const std::vector<float> zf{-3.0f};
    std::vector<float> af(1);
    leaky_relu_forward(af.data(), zf.data(), 1, 0.1);
    CHECK(af[0] == -3.0f * 0.1f);
    CHECK_THROWS(leaky_relu_slope("leaky_relu", std::numeric_limits<double>::infinity()),
                 "[leaky_relu] negative_slope: expected a finite float, got inf");
    CHECK(leaky_relu_slope("leaky_relu", -2.5) == -2.5);
}

TEST_CASE("activation gelu: the erf form and torch's tanh approximation, known values") {
    const double inf = std::numeric_limits<double>::infinity();
    const V z{0, 1, -1, 3, 40, -40, inf};
    V a(z.size()), dz(z.size());
    gelu_forward(a.data(), z.data(), int64_t(z.size()), GeluApproximate::None);
    // Phi(1) = 0.841344746068543, Phi(3) = 0.998650101968370
    CHECK_CLOSE(a.data(), (V{0, 0.841344746068543, -0.158655253931457, 2.99595030590511, 40, 0}), 0,
                1e-14);
    CHECK(a[6] == inf);
    gelu_forward(a.data(), z.data(), int64_t(z.size()), GeluApproximate::Tanh);
    const double t1 = std::tanh(std::sqrt(2 / M_PI) * 1.044715);
    CHECK_CLOSE(a.data(), (V{0, 0.5 * (1 + t1), -0.5 * (1 - t1)}), 0, 1e-15);
    CHECK(a[4] == 40 && a[5] == 0 && a[6] == inf);
    const V da(z.size(), 1.0);
    gelu_backward(dz.data(), da.data(), z.data(), 3, GeluApproximate::None);
    const double pdf1 = std::exp(-0.5) / std::sqrt(2 * M_PI);  // Phi(z) + z phi(z)
    CHECK_CLOSE(dz.data(), (V{0.5, 0.841344746068543 + pdf1, 0.158655253931457 - pdf1}), 0, 1e-14);
    CHECK(parse_gelu_approximate("gelu", "tanh") == GeluApproximate::Tanh);
    CHECK(std::string(gelu_approximate_str(GeluApproximate::None)) == "none");
    CHECK_THROWS(parse_gelu_approximate("gelu", "x"),
                 "[gelu] approximate: expected 'none' or 'tanh', got 'x'");
}

TEST_CASE("activation gelu and silu backward: finite differences; float within half an ulp") {
    V z = random_values(40, 21);
    for (auto& v : z) v *= 3;
    const auto n = int64_t(z.size());
    for (const auto approximate : {GeluApproximate::None, GeluApproximate::Tanh})
        check_finite_differences(
            z, random_values(z.size(), 22),
            [&](double* a, const double* in) { gelu_forward(a, in, n, approximate); },
            [&](double* dz, const double* g, const double* in) {
                gelu_backward(dz, g, in, n, approximate);
            });
    check_finite_differences(
        z, random_values(z.size(), 23),
        [&](double* a, const double* in) { silu_forward(a, in, n); },
        [&](double* dz, const double* g, const double* in) { silu_backward(dz, g, in, n); });

    const std::vector<float> zf{0.25f, -2.5f, 7.0f, -100.0f};
    std::vector<float> af(4);
    silu_forward(af.data(), zf.data(), 4);
    V want(4);
    for (size_t i = 0; i < 4; ++i) want[i] = zf[i] / (1 + std::exp(-double(zf[i])));
    CHECK_CLOSE(af.data(), want, 1e-45, 6e-8);
    gelu_forward(af.data(), zf.data(), 4, GeluApproximate::None);
    for (size_t i = 0; i < 4; ++i) want[i] = zf[i] * 0.5 * std::erfc(-zf[i] / std::sqrt(2.0));
    CHECK_CLOSE(af.data(), want, 1e-45, 6e-8);
}

TEST_CASE("activation leaky_relu, gelu and silu results do not depend on the thread count") {
    const int64_t n = 200003;
    const V z = random_values(size_t(n), 31), da = random_values(size_t(n), 32);
    CHECK_THREAD_COUNT_INDEPENDENT([&]() {
        V a(n), dz(n), g(n), dg(n), s(n), ds(n);
        leaky_relu_forward(a.data(), z.data(), n, 0.2);
        leaky_relu_backward(dz.data(), da.data(), z.data(), n, 0.2);
        gelu_forward(g.data(), z.data(), n, GeluApproximate::Tanh);
        gelu_backward(dg.data(), da.data(), z.data(), n, GeluApproximate::None);
        silu_forward(s.data(), z.data(), n);
        silu_backward(ds.data(), da.data(), z.data(), n);
        return std::vector<std::string>{bytes_of(a),  bytes_of(dz), bytes_of(g),
                                        bytes_of(dg), bytes_of(s),  bytes_of(ds)};
    });
}

// ---- softmax, log_softmax ----------------------------------------------------------------

TEST_CASE("softmax and log_softmax: known values along each dim, stable for large logits") {
    // z (2, 3): rows (0, ln 2, ln 5) and (1000, 1000, 1000) along dim 1 (exp(1000) overflows)
    const double l2 = std::log(2.0), l5 = std::log(5.0);
    const V z{0, l2, l5, 1000, 1000, 1000};
    V a(6), la(6);
    const SoftmaxDims rows = softmax_dims("softmax", {2, 3}, 1);
    CHECK(rows.outer == 2 && rows.K == 3 && rows.inner == 1);
    softmax_forward(a.data(), z.data(), rows);
    CHECK_CLOSE(a.data(), (V{1.0 / 8, 2.0 / 8, 5.0 / 8, 1.0 / 3, 1.0 / 3, 1.0 / 3}), 0, 1e-15);
    log_softmax_forward(la.data(), z.data(), rows);
    CHECK_CLOSE(la.data(),
                (V{-std::log(8.0), l2 - std::log(8.0), l5 - std::log(8.0), -std::log(3.0),
                   -std::log(3.0), -std::log(3.0)}),
                0, 1e-14);
    // along dim 0 (= -2): the columns, (outer 1, K 2, inner 3)
    const SoftmaxDims columns = softmax_dims("softmax", {2, 3}, -2);
    CHECK(columns.outer == 1 && columns.K == 2 && columns.inner == 3);
    softmax_forward(a.data(), z.data(), columns);
    for (int64_t i = 0; i < 3; ++i) {
        const double e = std::exp(z[size_t(i)] - z[size_t(3 + i)]);  // exp(-1000): 0
        CHECK_CLOSE(a.data() + i, (V{e / (1 + e)}), 1e-300, 1e-15);
        CHECK_CLOSE(a.data() + 3 + i, (V{1 / (1 + e)}), 0, 1e-15);
    }
    // a NaN in a slice makes that slice NaN, the others stay
    V nan_z{1, std::nan(""), 2, 3, 4, 5};
    softmax_forward(a.data(), nan_z.data(), rows);
    CHECK(std::isnan(a[0]) && std::isnan(a[1]) && std::isnan(a[2]) && !std::isnan(a[3]));
}

TEST_CASE("softmax and log_softmax backward: finite differences along every dim") {
    const Shape shape{2, 3, 4};
    const V z = random_values(24, 41), g = random_values(24, 42);
    for (int64_t dim : {0, 1, 2, -1}) {
        const SoftmaxDims d = softmax_dims("softmax", shape, dim);
        V a(24);
        softmax_forward(a.data(), z.data(), d);
        check_finite_differences(
            z, g, [&](double* out, const double* in) { softmax_forward(out, in, d); },
            [&](double* dz, const double* da, const double*) {
                softmax_backward(dz, da, a.data(), d);
            });
        log_softmax_forward(a.data(), z.data(), d);
        check_finite_differences(
            z, g, [&](double* out, const double* in) { log_softmax_forward(out, in, d); },
            [&](double* dz, const double* da, const double*) {
                log_softmax_backward(dz, da, a.data(), d);
            });
    }
}

TEST_CASE("softmax: a dim beyond the input's dims is refused; empty inputs pass") {
    CHECK_THROWS(softmax_dims("softmax", {2, 3}, 2),
                 "[softmax] dim: expected an int in [-2, 1] (input shape (2, 3)), got 2");
    CHECK_THROWS(softmax_dims("log_softmax", {4}, -2),
                 "[log_softmax] dim: expected an int in [-1, 0] (input shape (4,)), got -2");
    const SoftmaxDims scalar = softmax_dims("softmax", {}, -1);  // a 0-d input: one element
    CHECK(scalar.outer == 1 && scalar.K == 1 && scalar.inner == 1);
    const SoftmaxDims empty = softmax_dims("softmax", {0, 3}, 1);
    CHECK(empty.outer * empty.inner == 0);
}

TEST_CASE("softmax and log_softmax results do not depend on the thread count") {
    const Shape shape{3, 17, 4099};  // threads split the slices, inside an outer block too
    const int64_t n = 3 * 17 * 4099;
    const V z = random_values(size_t(n), 43), da = random_values(size_t(n), 44);
    CHECK_THREAD_COUNT_INDEPENDENT([&]() {
        std::vector<std::string> out;
        for (int64_t dim : {1, 2}) {
            const SoftmaxDims d = softmax_dims("softmax", shape, dim);
            V a(n), dz(n), la(n), dl(n);
            softmax_forward(a.data(), z.data(), d);
            softmax_backward(dz.data(), da.data(), a.data(), d);
            log_softmax_forward(la.data(), z.data(), d);
            log_softmax_backward(dl.data(), da.data(), la.data(), d);
            for (const V* v : {&a, &dz, &la, &dl}) out.push_back(bytes_of(*v));
        }
        return out;
    });
}

// ---- dropout -------------------------------------------------------------------------------

TEST_CASE("dropout hash: SplitMix64's published outputs for seed 0") {
    // mix64(0) = 0, so seed 0 is SplitMix64 started from state 0
    CHECK(dropout_hash(0, 0) == 0xE220A8397B1DCDAFull);
    CHECK(dropout_hash(0, 1) == 0x6E789E6AA1B965F4ull);
    CHECK(dropout_hash(0, 2) == 0x06C45D188009454Full);
    CHECK(dropout_hash(1, 0) != dropout_hash(0, 0));
}

TEST_CASE("dropout forward: mask from the hash, output x * mask / (1 - p)") {
    const int64_t n = 1000;
    const V x = random_values(n, 21);
    V y(n);
    std::vector<uint8_t> mask(n);
    const auto params = dropout_params("dropout", 0.25, 42);
    dropout_forward(y.data(), mask.data(), x.data(), n, params);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double u = double(dropout_hash(42, uint64_t(i)) >> 11) * 0x1p-53;
        CHECK(mask[i] == (u >= 0.25 ? 1 : 0));
        CHECK(y[i] == (mask[i] ? x[i] / 0.75 : x[i] * 0.0));
        kept += mask[i];
    }
    // Bernoulli(0.75) over 1000: sigma ~ 13.7
    CHECK(kept > 750 - 70 && kept < 750 + 70);

    // float: 1 - p rounded to float, then x * mask / that
    const std::vector<float> xf(x.begin(), x.end());
    std::vector<float> yf(n);
    std::vector<uint8_t> maskf(n);
    dropout_forward(yf.data(), maskf.data(), xf.data(), n, params);
    CHECK(maskf == mask);
    for (int64_t i = 0; i < n; ++i) CHECK(yf[i] == xf[i] * float(mask[i]) / 0.75f);
}

TEST_CASE("dropout p = 0 is the identity, p = 1 gives x * 0") {
    const double inf = std::numeric_limits<double>::infinity();
    const V x{1.5, -2.0, -0.0, inf};
    V y(4);
    std::vector<uint8_t> mask(4);
    dropout_forward(y.data(), mask.data(), x.data(), 4, dropout_params("dropout", 0.0, 3));
    CHECK(same_bits(y, x));
    CHECK((mask == std::vector<uint8_t>{1, 1, 1, 1}));
    dropout_forward(y.data(), mask.data(), x.data(), 4, dropout_params("dropout", 1.0, 3));
    CHECK((mask == std::vector<uint8_t>{0, 0, 0, 0}));
    CHECK(y[0] == 0 && y[1] == 0 && std::signbit(y[1]) && y[2] == 0 && std::isnan(y[3]));
    V dx(4);
    const std::vector<uint8_t> all{1, 1, 1, 1};
    const V dy{1, 2, 3, 4};
    dropout_backward(dx.data(), dy.data(), all.data(), 4, dropout_params("dropout", 1.0));
    CHECK_CLOSE(dx.data(), (V{0, 0, 0, 0}), 0, 0);
}

TEST_CASE("dropout backward: dy * mask / (1 - p), finite differences") {
    const int64_t n = 60;
    const V x = random_values(n, 31), g = random_values(n, 32);
    const auto params = dropout_params("dropout", 0.4, 9);
    std::vector<uint8_t> mask(n);  // the same seed, the same mask: J is linear in x
    auto forward = [&](double* y, const double* in) {
        dropout_forward(y, mask.data(), in, n, params);
    };
    auto backward = [&](double* dx, const double* dy, const double*) {
        dropout_backward(dx, dy, mask.data(), n, params);
    };
    check_finite_differences(x, g, forward, backward);
    V y(n), dx(n);
    forward(y.data(), x.data());
    backward(dx.data(), g.data(), x.data());
    for (int64_t i = 0; i < n; ++i) CHECK(dx[i] == (mask[i] ? g[i] / 0.6 : g[i] * 0.0));
    // any nonzero byte is a kept element
    std::vector<uint8_t> bytes(mask);
    for (auto& b : bytes) b = b ? 7 : 0;
    V dx7(n);
    dropout_backward(dx7.data(), g.data(), bytes.data(), n, params);
    CHECK(same_bits(dx7, dx));
}

TEST_CASE("dropout results do not depend on the thread count") {
    const int64_t n = 200000;  // above the threading threshold
    const V x = random_values(n, 41);
    const auto params = dropout_params("dropout", 0.5, 1234567);
    CHECK_THREAD_COUNT_INDEPENDENT([&]() {
        V y(n), dx(n);
        std::vector<uint8_t> mask(n);
        dropout_forward(y.data(), mask.data(), x.data(), n, params);
        dropout_backward(dx.data(), x.data(), mask.data(), n, params);
        return std::vector<std::string>{bytes_of(mask), bytes_of(y), bytes_of(dx)};
    });
}

// ---- linear ------------------------------------------------------------------------------

TEST_CASE("linear forward and backward") {
    const V x{1, 2, 3, 4, 5, 6}, w{1, 0, -1, 0.5, 0.5, 0.5}, b{1, -1}, dy{1, 1, 1, 1};
    const Shape bias_shape{2};
    const auto d = linear_dims({2, 3}, {2, 3}, &bias_shape);
    V y(4), dx(6), dw(6), db(2);
    linear_forward(y.data(), x.data(), w.data(), b.data(), d);
    CHECK_CLOSE(y.data(), (V{-1, 2, -1, 6.5}), 0, 1e-15);
    linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
    CHECK_CLOSE(dx.data(), (V{1.5, 0.5, -0.5, 1.5, 0.5, -0.5}), 0, 1e-15);
    CHECK_CLOSE(dw.data(), (V{5, 7, 9, 5, 7, 9}), 0, 0);
    CHECK_CLOSE(db.data(), (V{2, 2}), 0, 0);
}

// ---- losses ------------------------------------------------------------------------------

TEST_CASE("loss binary cross-entropy: value, -100 clamp, gradient") {
    const V a{0.5, 0.0}, y{1, 1};
    CHECK_CLOSE(binary_cross_entropy_forward(a.data(), y.data(), 1), std::log(2.0), 0, 1e-15);
    // a = 0 with y = 1: log clamped at -100, so the mean of (log 2, 100)
    CHECK_CLOSE(binary_cross_entropy_forward(a.data(), y.data(), 2), (std::log(2.0) + 100) / 2, 0,
                1e-15);
    V da(1);
    binary_cross_entropy_backward(da.data(), a.data(), y.data(), 1);
    CHECK_CLOSE(da.data(), (V{-2}), 0, 1e-15);
}

TEST_CASE("loss binary cross-entropy with logits: stable for large logits") {
    const V z{0, 1000, -1000}, y{1, 0, 0};
    const double one = binary_cross_entropy_with_logits_forward(z.data(), y.data(), 1);
    CHECK_CLOSE(one, std::log(2.0), 0, 1e-15);
    const double three = binary_cross_entropy_with_logits_forward(z.data(), y.data(), 3);
    CHECK_CLOSE(three, (std::log(2.0) + 1000) / 3, 0, 1e-15);
    V dz(3);
    binary_cross_entropy_with_logits_backward(dz.data(), z.data(), y.data(), 3);
    CHECK_CLOSE(dz.data(), (V{-0.5 / 3, 1.0 / 3, 0}), 1e-300, 1e-15);
}

TEST_CASE("loss cross-entropy: value and gradient, stable") {
    const V logits{0, 0, 1000, 0};
    const std::vector<int64_t> labels{0, 1};
    CHECK_CLOSE(cross_entropy_forward(logits.data(), labels.data(), 1, 2), std::log(2.0), 0, 1e-15);
    CHECK_CLOSE(cross_entropy_forward(logits.data(), labels.data(), 2, 2),
                (std::log(2.0) + 1000) / 2, 0, 1e-15);
    V dz(4);
    cross_entropy_backward(dz.data(), logits.data(), labels.data(), 2, 2);
    CHECK_CLOSE(dz.data(), (V{-0.25, 0.25, 0.5, -0.5}), 0, 1e-15);
}

TEST_CASE("loss options: reductions, weights, pos_weight") {
    double* no_losses = nullptr;  // the reduced losses write no per-element values
    const double* no_weight = nullptr;
    const V a{0.25, 0.5, 0.75, 0.5}, y{1, 0, 1, 1}, w{2, 1, 0.5, 3};
    V none(4);
    CHECK(binary_cross_entropy_forward(none.data(), a.data(), y.data(), w.data(), 4,
                                       Reduction::None) == 0.0);
    const V expected{-2 * std::log(0.25), -std::log(0.5), -0.5 * std::log(0.75),
                     -3 * std::log(0.5)};
    CHECK_CLOSE(none.data(), expected, 0, 1e-15);
    const double sum = expected[0] + expected[1] + expected[2] + expected[3];
    const double got_sum =
        binary_cross_entropy_forward(no_losses, a.data(), y.data(), w.data(), 4, Reduction::Sum);
    CHECK_CLOSE(&got_sum, (V{sum}), 0, 1e-15);
    const double got_mean =
        binary_cross_entropy_forward(no_losses, a.data(), y.data(), w.data(), 4, Reduction::Mean);
    CHECK_CLOSE(&got_mean, (V{sum / 4}), 0, 1e-15);
    // the gradient of 'none' given grad_output equals the weighted elementwise formula
    const V g{1, -2, 0.5, 3};
    V da(4), want(4);
    binary_cross_entropy_backward(da.data(), a.data(), y.data(), w.data(), 4, Reduction::None,
                                  g.data(), 1.0);
    for (int i = 0; i < 4; ++i) want[i] = g[i] * w[i] * (a[i] - y[i]) / (a[i] * (1 - a[i]));
    CHECK_CLOSE(da.data(), want, 0, 1e-15);
    // pos_weight p weighs the positive term: y = 1 costs p * log(1 + exp(-z))
    const V z{0.5}, one{1}, p{3};
    const double positive = binary_cross_entropy_with_logits_forward(
        no_losses, z.data(), one.data(), no_weight, p.data(), 1, Reduction::Mean);
    CHECK_CLOSE(&positive, (V{3 * std::log1p(std::exp(-0.5))}), 0, 1e-15);
}

TEST_CASE("loss options: cross-entropy weights, ignore_index, smoothing, spatial targets") {
    double* no_losses = nullptr;
    const double* no_target = nullptr;
    // logits (N=1, K=2, S=2): position 0 has logits (0, 0), position 1 (1000, 0)
    const V logits{0, 1000, 0, 0}, weight{2, 0.5};
    const std::vector<int64_t> labels{1, -100};
    const CrossEntropyDims dims{1, 2, 2, false};
    CrossEntropyParams params;
    // position 1 is ignored: the mean divides by weight[1] only
    const double mean = cross_entropy_forward(no_losses, logits.data(), labels.data(), no_target,
                                              weight.data(), dims, params);
    CHECK_CLOSE(&mean, (V{std::log(2.0)}), 0, 1e-15);
    // every label ignored: nan for the mean, 0 for the sum, as torch
    const std::vector<int64_t> ignored{-100, -100};
    CHECK(std::isnan(cross_entropy_forward(no_losses, logits.data(), ignored.data(), no_target,
                                           weight.data(), dims, params)));
    params.reduction = Reduction::Sum;
    CHECK(cross_entropy_forward(no_losses, logits.data(), ignored.data(), no_target, weight.data(),
                                dims, params) == 0.0);
    // label smoothing eps: the target is (1 - eps) onehot + eps / K; at equal logits every
    // class costs log 2, so the loss is (w_label (1 - eps) + eps / K * sum(w)) log 2
    params.label_smoothing = 0.2;
    params.reduction = Reduction::None;
    V losses(2);
    cross_entropy_forward(losses.data(), logits.data(), labels.data(), no_target, weight.data(),
                          dims, params);
    CHECK_CLOSE(losses.data(), (V{(0.5 * 0.8 + 0.1 * 2.5) * std::log(2.0), 0}), 0, 1e-15);
    // probabilities of the logits' shape: the uniform target costs log 2 at equal logits and
    // (log(1 + e^-1000) + (1000 + log(1 + e^-1000))) / 2 = 500 at (1000, 0)
    const V probabilities{0.5, 0.5, 0.5, 0.5};
    const CrossEntropyDims prob_dims{1, 2, 2, true};
    const double uniform =
        cross_entropy_forward(no_losses, logits.data(), nullptr, probabilities.data(), no_target,
                              prob_dims, CrossEntropyParams{});
    CHECK_CLOSE(&uniform, (V{(std::log(2.0) + 500) / 2}), 0, 1e-15);
}

TEST_CASE("loss options: nll_loss weights, ignore_index, reductions, gradient") {
    // input (N=2, K=3) log-probabilities; labels 2 and ignored, then 0 and 1
    const V input{-0.5, -1.5, -2.0, -0.25, -3.0, -1.0}, weight{2, 0.5, 4};
    const CrossEntropyDims dims{2, 3, 1, false};
    CrossEntropyParams params;
    double* no_losses = nullptr;
    const std::vector<int64_t> some{2, -100}, both{0, 1};
    // mean: -(4 * -2.0) / 4, the ignored row counting for nothing
    CHECK(nll_loss_forward(no_losses, input.data(), some.data(), weight.data(), dims, params) ==
          2.0);
    // mean over the weights: (2 * 0.5 + 0.5 * 3.0) / 2.5 = 1
    CHECK_CLOSE(nll_loss_forward(no_losses, input.data(), both.data(), weight.data(), dims, params),
                1.0, 0, 1e-15);
    params.reduction = Reduction::None;
    V losses(2);
    nll_loss_forward(losses.data(), input.data(), both.data(), weight.data(), dims, params);
    CHECK_CLOSE(losses.data(), (V{1.0, 1.5}), 0, 1e-15);
    // the gradient: -g * weight at the label, zero elsewhere and where ignored
    const V g{2, 3};
    V dinput(6);
    nll_loss_backward(dinput.data(), some.data(), weight.data(), dims, params, g.data(), 1.0);
    CHECK(dinput == (V{0, 0, -8, 0, 0, 0}));
    params.reduction = Reduction::Mean;
    nll_loss_backward(dinput.data(), both.data(), weight.data(), dims, params,
                      static_cast<const double*>(nullptr), 1.0);
    CHECK_CLOSE(dinput.data(), (V{-0.8, 0, 0, 0, -0.2, 0}), 0, 1e-15);
    // every label ignored: nan for the mean, as torch
    const std::vector<int64_t> none{-100, -100};
    CHECK(std::isnan(
        nll_loss_forward(no_losses, input.data(), none.data(), weight.data(), dims, params)));
}

TEST_CASE("fma_peak: the chains loop counts 2 flops per lane per chain and step, and runs") {
    // 12 chains of one vector each: W lanes, W = 4 (generic), 8 (avx2), 16 (avx512)
    const auto& kernels = detail::kernels_for_cpu<float>();
    const std::string isa = kernels.isa;
    const double lanes = isa == "avx512" ? 16 : isa == "avx2" ? 8 : 4;
    float sink = 0;
    CHECK(kernels.fma_chains(100, &sink) == 2 * lanes * 12 * 100);
    // the values move from 0..11 toward 1: their sum is finite and positive
    CHECK(std::isfinite(sink) && sink > 0);
    const double gflops = fma_peak_gflops(0.01);
    CHECK(std::isfinite(gflops) && gflops > 0);
}

TEST_CASE("conv2d: the epilogue gives the bits of batch_norm2d and relu after the forward") {
    // conv2d_forward with an epilogue against the three passes it stands for, on every forward
    // path (the crop of the padded grid, side by side, in bands; a pass after the others)
    const ForwardPathCase cases[] = {
        {{3, 5, 11, 9}, {18, 5, 3, 3}, {1, 1, 1, 1}, "forward_padded"},
        {{64, 8, 4, 4}, {16, 8, 3, 3}, {1, 1, 1, 1}, "forward_padded"},     // side by side
        {{1, 16, 64, 61}, {32, 16, 3, 3}, {1, 1, 1, 1}, "forward_padded"},  // bands, threads
        {{2, 16, 24, 24}, {32, 16, 3, 3}, {2, 2, 1, 1}, "forward_padded"},  // polyphase
        {{2, 12, 10, 10}, {18, 4, 3, 3}, {1, 1, 1, 1, 1, 1, 3}, "forward_padded"},  // groups
        {{2, 8, 12, 12}, {8, 1, 3, 3}, {1, 1, 1, 1, 1, 1, 8}, "forward_padded"},    // depthwise
        {{2, 8, 12, 12}, {8, 1, 3, 3}, {2, 2, 1, 1, 1, 1, 8}, "forward_depthwise"},
        {{2, 16, 14, 14}, {24, 8, 1, 1}, {2, 2, 0, 0, 1, 1, 2}, "forward_gemm"},  // groups
        {{2, 2, 6, 6}, {3, 2, 3, 3}, {2, 2, 1, 1}, "forward_direct"},
    };
    unsigned seed = 130;
    for (const auto& c : cases) {
        const auto d = dims_on_path(c);
        const int64_t K = d.K, out_count = d.N * d.K * d.P * d.Q;
        const std::vector<float> x = random_values<float>(numel(c.x), seed++),
                                 w = random_values<float>(numel(c.w), seed++),
                                 b = random_values<float>(K, seed++),
                                 gamma = random_values<float>(K, seed++),
                                 beta = random_values<float>(K, seed++, 0.5),
                                 mean = random_values<float>(K, seed++, 0.5);
        std::vector<float> var = random_values<float>(K, seed++), unused(K);
        for (float& v : var) v = v * v + 0.1f;
        std::vector<float> center(K), scale(K), shift(K);
        batch_norm2d_eval_affine(center.data(), scale.data(), shift.data(), gamma.data(),
                                 beta.data(), mean.data(), var.data(), K, 1e-5);
        // the three passes
        std::vector<float> z(out_count), normed(out_count), activated(out_count);
        conv2d_forward(z.data(), x.data(), w.data(), b.data(), d);
        const BatchNorm2dParams eval{false, 0.1, 1e-5};
        std::vector<float> running_mean = mean;
        batch_norm2d_forward(normed.data(), unused.data(), unused.data(), z.data(), gamma.data(),
                             beta.data(), running_mean.data(), var.data(),
                             BatchNorm2dDims{d.N, K, d.P, d.Q}, eval);
        relu_forward(activated.data(), normed.data(), out_count);
        std::vector<float> zr(out_count);
        relu_forward(zr.data(), z.data(), out_count);
        struct Variant {
            Conv2dEpilogue<float> then;
            const std::vector<float>& expected;
        };
        const Variant variants[] = {
            {{center.data(), scale.data(), shift.data(), true}, activated},
            {{center.data(), scale.data(), shift.data(), false}, normed},
            {{nullptr, nullptr, nullptr, true}, zr},
            {{}, z},
        };
        for (const auto& v : variants) {
            std::vector<float> y(out_count);
            conv2d_forward(y.data(), x.data(), w.data(), b.data(), d, v.then);
            CHECK(bytes_of(y) == bytes_of(v.expected));
        }
    }
}
