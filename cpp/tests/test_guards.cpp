// Every kernel writes exactly its outputs: each output buffer sits between guard regions
// (check.hpp's Guarded), which must be untouched afterwards, and every element inside must
// have been written. The shapes reach every path: direct loops, packed GEMM, padded and
// strided convolutions, the 2x2 max-pool kernel and the generic one, vector tails, and
// sizes above the threads' threshold.
#include <random>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using cnnbp_test::dot;
using cnnbp_test::Guarded;
using cnnbp_test::random_values;

namespace {

template <typename T>
void conv2d_guarded(const Shape& xs, const Shape& ws, const Conv2dParams& params, unsigned seed) {
    const Shape bias_shape{ws[0]};
    const auto d = conv2d_dims(xs, ws, &bias_shape, params);
    const auto x = random_values<T>(numel(xs), seed), w = random_values<T>(numel(ws), seed + 1),
               b = random_values<T>(d.K, seed + 2);
    const auto dy = random_values<T>(d.N * d.K * d.P * d.Q, seed + 3);
    Guarded<T> y(dy.size()), dx(x.size()), dw(w.size()), db(b.size());
    conv2d_forward(y.data(), x.data(), w.data(), b.data(), d);
    conv2d_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
    CHECK_GUARDED(y);
    CHECK_GUARDED(dx);
    CHECK_GUARDED(dw);
    CHECK_GUARDED(db);
    // one gradient at a time (the others nullptr): still nothing outside
    Guarded<T> dx_only(x.size()), dw_only(w.size()), db_only(b.size());
    conv2d_backward(dx_only.data(), (T*)nullptr, (T*)nullptr, dy.data(), x.data(), w.data(), d);
    conv2d_backward((T*)nullptr, dw_only.data(), (T*)nullptr, dy.data(), x.data(), w.data(), d);
    conv2d_backward((T*)nullptr, (T*)nullptr, db_only.data(), dy.data(), x.data(), w.data(), d);
    CHECK_GUARDED(dx_only);
    CHECK_GUARDED(dw_only);
    CHECK_GUARDED(db_only);
}

template <typename T>
void max_pool2d_guarded(const Shape& xs, const Pool2dParams& params, unsigned seed) {
    const auto d = pool2d_dims("max_pool2d", xs, params);
    const auto x = random_values<T>(numel(xs), seed);
    const size_t out = size_t(d.N * d.C * d.P * d.Q);
    Guarded<T> y(out);
    Guarded<int64_t> idx(out);
    max_pool2d_forward(y.data(), idx.data(), x.data(), d);
    CHECK_GUARDED(y);
    CHECK_GUARDED(idx);
    const auto dy = random_values<T>(out, seed + 1);
    check_pool_indices(idx.data(), int64_t(out), d.H * d.W);
    Guarded<T> dx(x.size());
    max_pool2d_backward(dx.data(), dy.data(), idx.data(), d);
    CHECK_GUARDED(dx);
}

template <typename T>
void activations_guarded(size_t count, unsigned seed) {
    const auto z = random_values<T>(count, seed), da = random_values<T>(count, seed + 1);
    Guarded<T> a(count), dz(count), s(count), ds(count);
    relu_forward(a.data(), z.data(), int64_t(count));
    relu_backward(dz.data(), da.data(), z.data(), int64_t(count));
    sigmoid_forward(s.data(), z.data(), int64_t(count));
    sigmoid_backward(ds.data(), da.data(), s.data(), int64_t(count));
    CHECK_GUARDED(a);
    CHECK_GUARDED(dz);
    CHECK_GUARDED(s);
    CHECK_GUARDED(ds);
}

template <typename T>
void linear_guarded(const Shape& xs, const Shape& ws, unsigned seed) {
    const Shape bias_shape{ws[0]};
    const auto d = linear_dims(xs, ws, &bias_shape);
    const auto x = random_values<T>(numel(xs), seed), w = random_values<T>(numel(ws), seed + 1),
               b = random_values<T>(d.OUT, seed + 2), dy = random_values<T>(d.M * d.OUT, seed + 3);
    Guarded<T> y(dy.size()), dx(x.size()), dw(w.size()), db(b.size());
    linear_forward(y.data(), x.data(), w.data(), b.data(), d);
    linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), d);
    CHECK_GUARDED(y);
    CHECK_GUARDED(dx);
    CHECK_GUARDED(dw);
    CHECK_GUARDED(db);
}

template <typename T>
void losses_guarded(int64_t N, int64_t K, unsigned seed) {
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
    CHECK_GUARDED(da);
    CHECK_GUARDED(dz);
    CHECK_GUARDED(dlogits);
}

}  // namespace

TEST_CASE("conv2d guards: outputs written exactly, on every path") {
    struct Case {
        Shape x, w;
        Conv2dParams p;
    };
    const Case cases[] = {
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
    };
    unsigned seed = 100;
    for (const auto& c : cases) {
        conv2d_guarded<float>(c.x, c.w, c.p, seed);
        conv2d_guarded<double>(c.x, c.w, c.p, seed + 10);
        seed += 20;
    }
}

TEST_CASE("max_pool2d guards: outputs written exactly, on every path") {
    struct Case {
        Shape x;
        Pool2dParams p;
    };
    const Case cases[] = {
        {{1, 1, 4, 4}, {2, 2, 2, 2, 0, 0}},     // the 2x2 kernel
        {{2, 3, 7, 9}, {2, 2, 2, 2, 0, 0}},     // 2x2, odd sizes: a row and a column unseen
        {{1, 2, 2, 66}, {2, 2, 2, 2, 0, 0}},    // 2x2, a long run with a tail
        {{2, 2, 6, 6}, {3, 3, 2, 2, 1, 1}},     // generic, padded
        {{1, 1, 5, 5}, {3, 3, 1, 1, 1, 1}},     // overlapping windows
        {{1, 1, 1, 1}, {1, 1, 1, 1, 0, 0}},     // one element
        {{1, 1, 3, 2}, {5, 3, 1, 7, 2, 1}},     // windows mostly padding, stride past the end
        {{8, 16, 32, 32}, {2, 2, 2, 2, 0, 0}},  // above the threads' threshold
    };
    unsigned seed = 300;
    for (const auto& c : cases) {
        max_pool2d_guarded<float>(c.x, c.p, seed);
        max_pool2d_guarded<double>(c.x, c.p, seed + 10);
        seed += 20;
    }
}

TEST_CASE("activation guards: outputs written exactly, tails and threads") {
    unsigned seed = 500;
    for (size_t count : {size_t(0), size_t(1), size_t(7), size_t(15), size_t(16), size_t(17),
                         size_t(33), size_t(1000), size_t(70001)}) {
        activations_guarded<float>(count, seed);
        activations_guarded<double>(count, seed + 1);
        seed += 2;
    }
}

TEST_CASE("linear guards: outputs written exactly") {
    unsigned seed = 700;
    for (const auto& [x, w] : {std::pair<Shape, Shape>{{1, 1}, {1, 1}},
                               {{3, 5}, {2, 5}},
                               {{2, 3, 17}, {9, 17}},
                               {{64, 300}, {40, 300}}}) {
        linear_guarded<float>(x, w, seed);
        linear_guarded<double>(x, w, seed + 1);
        seed += 2;
    }
}

TEST_CASE("loss guards: gradients written exactly") {
    unsigned seed = 900;
    for (const auto& [N, K] : {std::pair<int64_t, int64_t>{1, 1}, {3, 5}, {17, 2}, {64, 33}}) {
        losses_guarded<float>(N, K, seed);
        losses_guarded<double>(N, K, seed + 2);
        seed += 4;
    }
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
}
