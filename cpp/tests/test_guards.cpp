// Every kernel writes exactly its outputs: each output buffer sits between guard regions
// (check.hpp's Guarded), which must be untouched afterwards, and every element inside must
// have been written. The shapes reach every path: direct loops, packed GEMM, padded and
// strided convolutions, the 2x2 max-pool kernel and the generic one, vector tails, and
// sizes above the threads' thresholds.
#include <random>
#include <sstream>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using cnnbp_test::Guarded;
using cnnbp_test::PoolCase;
using cnnbp_test::random_values;

namespace {

// A kernel pair with weight and bias (conv2d, linear) on random values of the given sizes:
// forward(y, x, w, b) and backward(dx, dw, db, dy, x, w), then backward again for one
// gradient at a time (the others nullptr), which must still write nothing outside.
template <typename T, typename Forward, typename Backward>
void weighted_guarded(size_t nx, size_t nw, size_t nb, size_t ny, unsigned seed, Forward forward,
                      Backward backward) {
    const auto x = random_values<T>(nx, seed), w = random_values<T>(nw, seed + 1),
               b = random_values<T>(nb, seed + 2), dy = random_values<T>(ny, seed + 3);
    Guarded<T> y(ny), dx(nx), dw(nw), db(nb);
    forward(y.data(), x.data(), w.data(), b.data());
    backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data());
    CHECK_GUARDED(y, dx, dw, db);
    Guarded<T> dx_only(nx), dw_only(nw), db_only(nb);
    backward(dx_only.data(), (T*)nullptr, (T*)nullptr, dy.data(), x.data(), w.data());
    backward((T*)nullptr, dw_only.data(), (T*)nullptr, dy.data(), x.data(), w.data());
    backward((T*)nullptr, (T*)nullptr, db_only.data(), dy.data(), x.data(), w.data());
    CHECK_GUARDED(dx_only, dw_only, db_only);
}

// Each op's check for one row of its table, in the element type of `type` (float, double).

struct ConvCase {
    Shape x, w;
    Conv2dParams p;
};
const auto conv2d_guarded = [](auto type, const ConvCase& c, unsigned seed) {
    const Shape bias_shape{c.w[0]};
    const auto d = conv2d_dims(c.x, c.w, &bias_shape, c.p);
    weighted_guarded<decltype(type)>(
        numel(c.x), numel(c.w), d.K, d.N * d.K * d.P * d.Q, seed,
        [&](auto... args) { conv2d_forward(args..., d); },
        [&](auto... args) { conv2d_backward(args..., d); });
};

const auto linear_guarded = [](auto type, const std::pair<Shape, Shape>& xw, unsigned seed) {
    const Shape bias_shape{xw.second[0]};
    const auto d = linear_dims(xw.first, xw.second, &bias_shape);
    weighted_guarded<decltype(type)>(
        numel(xw.first), numel(xw.second), d.OUT, d.M * d.OUT, seed,
        [&](auto... args) { linear_forward(args..., d); },
        [&](auto... args) { linear_backward(args..., d); });
};

const auto max_pool2d_guarded = [](auto type, const PoolCase& c, unsigned seed) {
    using T = decltype(type);
    const auto d = pool2d_dims("max_pool2d", c.x, c.params);
    const auto x = random_values<T>(numel(c.x), seed);
    const size_t out = size_t(d.N * d.C * d.P * d.Q);
    Guarded<T> y(out);
    Guarded<int64_t> idx(out);
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    CHECK_GUARDED(y, idx);
    const auto dy = random_values<T>(out, seed + 1);
    check_pool_indices(idx.data(), int64_t(out), d.H * d.W);
    Guarded<T> dx(x.size());
    max_pool2d_backward(dx.data(), dy.data(), idx.data(), d);
    CHECK_GUARDED(dx);
};

const auto avg_pool2d_guarded = [](auto type, const PoolCase& c, unsigned seed) {
    using T = decltype(type);
    const auto d = pool2d_dims("avg_pool2d", c.x, c.params);
    const auto x = random_values<T>(numel(c.x), seed);
    const auto dy = random_values<T>(size_t(d.N * d.C * d.P * d.Q), seed + 1);
    Guarded<T> y(dy.size()), dx(x.size());
    avg_pool2d_forward(y.data(), x.data(), d);
    avg_pool2d_backward(dx.data(), dy.data(), d);
    CHECK_GUARDED(y, dx);
};

// relu, sigmoid and tanh, backward from the input (relu) or the output
const auto activations_guarded = [](auto type, size_t count, unsigned seed) {
    using T = decltype(type);
    const auto n = int64_t(count);
    const auto z = random_values<T>(count, seed), da = random_values<T>(count, seed + 1);
    Guarded<T> a(count), dz(count), s(count), ds(count), t(count), dt(count);
    relu_forward(a.data(), z.data(), n);
    relu_backward(dz.data(), da.data(), z.data(), n);
    sigmoid_forward(s.data(), z.data(), n);
    sigmoid_backward(ds.data(), da.data(), s.data(), n);
    tanh_forward(t.data(), z.data(), n);
    tanh_backward(dt.data(), da.data(), t.data(), n);
    CHECK_GUARDED(a, dz, s, ds, t, dt);
};

const auto dropout_guarded = [](auto type, size_t count, unsigned seed) {
    using T = decltype(type);
    const auto n = int64_t(count);
    const auto x = random_values<T>(count, seed), dy = random_values<T>(count, seed + 1);
    const auto params = dropout_params("dropout", 0.3, seed);
    Guarded<T> y(count), dx(count);
    Guarded<uint8_t> mask(count);
    dropout_forward(y.data(), mask.data(), x.data(), n, params);
    dropout_backward(dx.data(), dy.data(), mask.data(), n, params);
    CHECK_GUARDED(y, mask, dx);
};

// (N, K): N samples of K probabilities, targets or logits
const auto losses_guarded = [](auto type, const std::pair<int64_t, int64_t>& NK, unsigned seed) {
    using T = decltype(type);
    const auto [N, K] = NK;
    const size_t count = size_t(N * K);
    auto a = random_values<T>(count, seed), y = random_values<T>(count, seed + 1);
    for (auto& v : a) v = T(0.5) + v / T(4);  // probabilities in (0, 1)
    for (auto& v : y) v = v < 0 ? T(0) : T(1);
    std::vector<int64_t> labels(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) labels[size_t(n)] = (n * 7 + 3) % K;
    Guarded<T> da(count), dz(count), dlogits(count);
    binary_cross_entropy_backward(da.data(), a.data(), y.data(), int64_t(count));
    binary_cross_entropy_with_logits_backward(dz.data(), a.data(), y.data(), int64_t(count));
    cross_entropy_backward(dlogits.data(), a.data(), labels.data(), N, K);
    CHECK_GUARDED(da, dz, dlogits);
};

// check(T{}, row, seed) for T = float and for T = double on every row, each with seeds of
// its own.
template <typename Rows, typename Check>
void in_float_and_double(const Rows& rows, unsigned seed, Check check) {
    for (const auto& row : rows) {
        check(float{}, row, seed);
        check(double{}, row, seed + 10);
        seed += 20;
    }
}

}  // namespace

TEST_CASE("conv2d guards: outputs written exactly, on every path") {
    const ConvCase cases[] = {
        {{2, 3, 5, 4}, {2, 3, 3, 2}, {2, 1, 1, 1}},       // tiny: direct loops
        {{1, 1, 1, 1}, {1, 1, 1, 1}, {1, 1, 0, 0}},       // one element
        {{1, 1, 1, 1}, {1, 1, 3, 3}, {1, 1, 1, 1}},       // all padding but one cell
        {{3, 1, 12, 11}, {8, 1, 3, 3}, {1, 1, 0, 0}},     // one input channel
        {{2, 8, 9, 9}, {16, 8, 3, 3}, {1, 1, 1, 1}},      // padded unit-stride path
        {{2, 5, 7, 8}, {70, 5, 3, 2}, {1, 1, 1, 0}},      // many filters: dweight in place
        {{2, 34, 6, 6}, {3, 34, 3, 3}, {1, 1, 1, 1}},     // many channels: dinput as forward
        {{2, 6, 11, 9}, {10, 6, 3, 3}, {2, 1, 1, 0}},     // strided: im2col GEMM, col2im
        {{2, 30, 9, 9}, {9, 30, 3, 3}, {2, 2, 1, 1}},     // strided, two k-blocks
        {{1, 3, 8, 8}, {5, 3, 8, 8}, {1, 1, 0, 0}},       // kernel as large as the input
        {{2, 4, 13, 7}, {6, 4, 5, 1}, {3, 1, 2, 0}},      // tall filter, large stride
        {{9, 16, 16, 16}, {32, 16, 3, 3}, {1, 1, 1, 1}},  // above the threads' threshold
        // dilation, groups, 'same' (stride_h, stride_w, pad_h, pad_w, dh, dw, groups, same)
        {{2, 3, 9, 8}, {2, 3, 3, 2}, {1, 1, 2, 1, 2, 3, 1, false}},       // tiny, dilated
        {{2, 8, 12, 12}, {16, 4, 3, 3}, {1, 1, 2, 2, 2, 2, 2, false}},    // in place, grouped
        {{2, 8, 12, 11}, {16, 2, 3, 3}, {2, 1, 1, 1, 2, 1, 4, false}},    // strided, grouped
        {{2, 6, 9, 8}, {12, 1, 3, 3}, {1, 1, 1, 1, 1, 1, 6, false}},      // depthwise
        {{9, 32, 16, 16}, {32, 1, 3, 3}, {2, 2, 1, 1, 1, 1, 32, false}},  // depthwise, threads
        {{2, 4, 9, 41},
         {4, 1, 3, 3},
         {1, 2, 1, 1, 1, 2, 4, false}},  // depthwise, long strided rows
        {{2, 8, 10, 9}, {16, 8, 2, 4}, {1, 1, 0, 0, 3, 1, 1, true}},   // 'same', odd totals
        {{0, 8, 10, 9}, {16, 8, 3, 3}, {1, 1, 1, 1, 1, 1, 1, false}},  // an empty batch
    };
    in_float_and_double(cases, 100, conv2d_guarded);
}

// Pooling shapes for every path: the 2x2 kernel, the generic one, vector tails, windows
// mostly padding, threads, ceil_mode's partial windows.
const PoolCase kPoolShapes[] = {
    {{1, 1, 4, 4}, {2, 2, 2, 2, 0, 0}},     // the 2x2 kernel
    {{2, 3, 7, 9}, {2, 2, 2, 2, 0, 0}},     // 2x2, odd sizes: a row and a column unseen
    {{1, 2, 2, 66}, {2, 2, 2, 2, 0, 0}},    // 2x2, a long run with a tail
    {{2, 2, 6, 6}, {3, 3, 2, 2, 1, 1}},     // generic, padded
    {{1, 1, 5, 5}, {3, 3, 1, 1, 1, 1}},     // overlapping windows
    {{1, 1, 1, 1}, {1, 1, 1, 1, 0, 0}},     // one element
    {{1, 1, 3, 2}, {5, 3, 1, 7, 2, 1}},     // windows mostly padding, stride past the end
    {{8, 16, 32, 32}, {2, 2, 2, 2, 0, 0}},  // above the threads' threshold
    {{8, 16, 24, 24}, {3, 3, 2, 2, 1, 1}},  // above it, overlapping and padded
    // ceil_mode: the 2x2 kernels' partial last row and column of windows, clipped to the input
    {{2, 3, 7, 9}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},     // row and column
    {{1, 2, 9, 8}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},     // a row only
    {{1, 2, 3, 67}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},    // a vector tail
    {{2, 1, 1, 33}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},    // one input row
    {{2, 1, 31, 1}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},    // one column
    {{8, 16, 31, 31}, cnnbp_test::with_options({2, 2, 2, 2, 0, 0}, 1, true)},  // threads
    {{8, 16, 33, 33}, cnnbp_test::with_options({3, 3, 2, 2, 1, 1}, 1, true)},  // general, threads
};

TEST_CASE("max_pool2d guards: outputs written exactly, on every path") {
    in_float_and_double(kPoolShapes, 300, max_pool2d_guarded);
    in_float_and_double(cnnbp_test::max_pool_option_cases(), 700, max_pool2d_guarded);
}

TEST_CASE("avg_pool2d guards: outputs written exactly, on every path") {
    in_float_and_double(kPoolShapes, 400, avg_pool2d_guarded);
    in_float_and_double(cnnbp_test::pool_cases(), 600, avg_pool2d_guarded);
    in_float_and_double(cnnbp_test::avg_pool_option_cases(), 800, avg_pool2d_guarded);
}

// Element counts for the elementwise kernels: empty, vector tails, above the threads'
// thresholds (dropout's is higher).
const size_t kCounts[] = {0, 1, 7, 15, 16, 17, 33, 1000, 70001, 200001};

TEST_CASE("activation guards: outputs written exactly, tails and threads") {
    in_float_and_double(kCounts, 500, activations_guarded);
}

TEST_CASE("dropout guards: outputs and mask written exactly, tails and threads") {
    in_float_and_double(kCounts, 900, dropout_guarded);
}

TEST_CASE("linear guards: outputs written exactly") {
    const std::pair<Shape, Shape> shapes[] = {
        {{1, 1}, {1, 1}}, {{3, 5}, {2, 5}}, {{2, 3, 17}, {9, 17}}, {{64, 300}, {40, 300}}};
    in_float_and_double(shapes, 700, linear_guarded);
}

TEST_CASE("loss guards: gradients written exactly") {
    const std::pair<int64_t, int64_t> sizes[] = {{1, 1}, {3, 5}, {17, 2}, {64, 33}};
    in_float_and_double(sizes, 1100, losses_guarded);
}

TEST_CASE("activation guards: the helper notices stray and missing writes") {
    Guarded<float> past_end(4), gap(4), fine(4);
    float* p = past_end.data();
    for (int i = 0; i <= 4; ++i) p[i] = 1.0f;  // one past the end (inside the guard)
    CHECK(!past_end.guards_intact());
    gap.data()[0] = gap.data()[1] = gap.data()[3] = 0.0f;  // element 2 left alone
    CHECK(gap.guards_intact() && !gap.all_written());
    for (int i = 0; i < 4; ++i) fine.data()[i] = -0.0f;
    CHECK(fine.guards_intact() && fine.all_written());
    // CHECK_GUARDED reports each buffer that breaks a rule, and only those
    const int before = cnnbp_test::failures();
    std::ostringstream reports;
    auto* cerr = std::cerr.rdbuf(reports.rdbuf());
    CHECK_GUARDED(fine, past_end, gap);
    std::cerr.rdbuf(cerr);
    const int reported = cnnbp_test::failures() - before;
    cnnbp_test::failures() = before;  // the expected reports are not failures of this case
    CHECK(reported == 2);
    CHECK(reports.str().find("write outside output 1 of (fine, past_end, gap)") !=
          std::string::npos);
    CHECK(reports.str().find("an element of output 2 of (fine, past_end, gap) not written") !=
          std::string::npos);
}
