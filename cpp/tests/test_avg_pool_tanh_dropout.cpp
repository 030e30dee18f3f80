// avg_pool2d, tanh and dropout: small hand-computed answers, central finite differences,
// the pooling loops against plain window-by-window loops bit for bit, results for one and
// two threads, and the validation of their parameters.
#include <cstring>
#include <limits>
#include <random>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using cnnbp_test::dot;
using cnnbp_test::random_values;
using V = std::vector<double>;

namespace {

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Central differences of objective() with respect to every value, each restored after use.
template <typename F>
V numeric_gradient(V& values, F objective) {
    const double h = 1e-6;
    V numeric(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
        const double saved = values[i];
        values[i] = saved + h;
        const double plus = objective();
        values[i] = saved - h;
        const double minus = objective();
        values[i] = saved;
        numeric[i] = (plus - minus) / (2 * h);
    }
    return numeric;
}

Pool2dDims avg_dims(const Shape& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                    int64_t pw) {
    return pool2d_dims("avg_pool2d", x, {kh, kw, sh, sw, ph, pw});
}

// torch's loops, written plainly: each window summed in row-major order over its in-bounds
// cells and divided by kh * kw; the backward scatters dy / (kh * kw) window by window.
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
                y[(nc * d.P + op) * d.Q + oq] = sum / T(p.kernel_h * p.kernel_w);
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
                const T g = dy[(nc * d.P + op) * d.Q + oq] / T(p.kernel_h * p.kernel_w);
                for (int64_t h = h0; h < h0 + p.kernel_h; ++h)
                    for (int64_t w = w0; w < w0 + p.kernel_w; ++w)
                        if (h >= 0 && h < d.H && w >= 0 && w < d.W)
                            dx[(nc * d.H + h) * d.W + w] += g;
            }
}

struct PoolCase {
    Shape x;
    int64_t kh, kw, sh, sw, ph, pw;
};

const PoolCase kPoolCases[] = {
    {{1, 1, 4, 4}, 2, 2, 2, 2, 0, 0},  {{2, 3, 7, 7}, 3, 3, 2, 2, 0, 0},
    {{2, 2, 9, 8}, 3, 3, 2, 2, 1, 1},  {{1, 2, 5, 7}, 2, 3, 1, 2, 1, 1},
    {{1, 1, 5, 5}, 5, 5, 1, 1, 2, 2},  {{2, 1, 7, 5}, 2, 2, 3, 3, 0, 0},
    {{1, 2, 8, 9}, 3, 3, 1, 1, 1, 1},  {{2, 2, 9, 9}, 5, 4, 1, 2, 2, 1},
    {{1, 1, 6, 13}, 1, 4, 1, 3, 0, 2}, {{3, 2, 11, 10}, 4, 3, 3, 1, 2, 1},
};

}  // namespace

// ---- avg_pool2d ----------------------------------------------------------------------------

TEST_CASE("avg_pool2d forward and backward: 2x2 windows") {
    V x(16);
    for (int i = 0; i < 16; ++i) x[i] = i;
    const auto d = avg_dims({1, 1, 4, 4}, 2, 2, 2, 2, 0, 0);
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
    const auto d = avg_dims({1, 1, 2, 2}, 2, 2, 1, 1, 1, 1);
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
    const auto d = avg_dims({1, 1, 5, 5}, 3, 3, 2, 2, 0, 0);
    const V dy{9, 18, 27, 36};
    V dx(25);
    avg_pool2d_backward(dx.data(), dy.data(), d);
    CHECK(dx[12] == 10 && dx[0] == 1 && dx[2] == 3 && dx[24] == 4);
    // kernel 2, stride 3 on 5 columns: column 2 is in no window
    const auto gap = avg_dims({1, 1, 2, 5}, 2, 2, 1, 3, 0, 0);
    const V ones{1, 1};
    V dgap(10);
    avg_pool2d_backward(dgap.data(), ones.data(), gap);
    CHECK_CLOSE(dgap.data(), (V{0.25, 0.25, 0, 0.25, 0.25, 0.25, 0.25, 0, 0.25, 0.25}), 0, 0);
}

TEST_CASE("avg_pool2d backward: finite differences") {
    unsigned seed = 1;
    for (const auto& c : kPoolCases) {
        const auto d = avg_dims(c.x, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw);
        V x = random_values(numel(c.x), seed++);
        const V g = random_values(d.N * d.C * d.P * d.Q, seed++);
        auto objective = [&]() {  // J = sum(avg_pool2d(x) * g)
            V y(g.size());
            avg_pool2d_forward(y.data(), x.data(), d);
            return dot(y, g);
        };
        V dx(x.size());
        avg_pool2d_backward(dx.data(), g.data(), d);
        CHECK_CLOSE(dx.data(), numeric_gradient(x, objective), 1e-9, 1e-6);
    }
}

TEST_CASE("avg_pool2d equals torch's window-by-window loops bit for bit") {
    // the kernels reorder the loops for vectorization but keep each element's additions in
    // torch's order: the same bits as the plain loops, in float and double
    unsigned seed = 100;
    for (const auto& c : kPoolCases) {
        const auto d = avg_dims(c.x, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw);
        const V x64 = random_values(numel(c.x), seed++);
        const V dy64 = random_values(d.N * d.C * d.P * d.Q, seed++);
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
    const int64_t before = get_num_threads();
    const auto d = avg_dims({8, 16, 24, 24}, 3, 3, 2, 2, 1, 1);  // above the threading threshold
    const V x64 = random_values(numel({8, 16, 24, 24}), 7);
    const std::vector<float> x(x64.begin(), x64.end());
    std::vector<float> y1(d.N * d.C * d.P * d.Q), y2(y1.size()), dx1(x.size()), dx2(x.size());
    set_num_threads(1);
    avg_pool2d_forward(y1.data(), x.data(), d);
    avg_pool2d_backward(dx1.data(), y1.data(), d);
    set_num_threads(2);
    avg_pool2d_forward(y2.data(), x.data(), d);
    avg_pool2d_backward(dx2.data(), y2.data(), d);
    set_num_threads(before);
    CHECK(same_bits(y1, y2));
    CHECK(same_bits(dx1, dx2));
}

// ---- tanh ----------------------------------------------------------------------------------

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
    const V g = random_values(z.size(), 12);
    auto objective = [&]() {
        V a(z.size());
        tanh_forward(a.data(), z.data(), int64_t(z.size()));
        return dot(a, g);
    };
    V a(z.size()), dz(z.size());
    tanh_forward(a.data(), z.data(), int64_t(z.size()));
    tanh_backward(dz.data(), g.data(), a.data(), int64_t(z.size()));
    CHECK_CLOSE(dz.data(), numeric_gradient(z, objective), 1e-9, 1e-6);
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
    V x = random_values(n, 31);
    const V g = random_values(n, 32);
    const auto params = dropout_params("dropout", 0.4, 9);
    std::vector<uint8_t> mask(n);
    auto objective = [&]() {  // the same seed, the same mask: linear in x
        V y(n);
        dropout_forward(y.data(), mask.data(), x.data(), n, params);
        return dot(y, g);
    };
    objective();
    V dx(n);
    dropout_backward(dx.data(), g.data(), mask.data(), n, params);
    for (int64_t i = 0; i < n; ++i) CHECK(dx[i] == (mask[i] ? g[i] / 0.6 : g[i] * 0.0));
    CHECK_CLOSE(dx.data(), numeric_gradient(x, objective), 1e-9, 1e-6);
    // any nonzero byte is a kept element
    std::vector<uint8_t> bytes(mask);
    for (auto& b : bytes) b = b ? 7 : 0;
    V dx7(n);
    dropout_backward(dx7.data(), g.data(), bytes.data(), n, params);
    CHECK(same_bits(dx7, dx));
}

TEST_CASE("dropout results do not depend on the thread count") {
    const int64_t before = get_num_threads(), n = 200000;  // above the threading threshold
    const V x = random_values(n, 41);
    const auto params = dropout_params("dropout", 0.5, 1234567);
    V y1(n), y2(n), dx1(n), dx2(n);
    std::vector<uint8_t> m1(n), m2(n);
    set_num_threads(1);
    dropout_forward(y1.data(), m1.data(), x.data(), n, params);
    dropout_backward(dx1.data(), x.data(), m1.data(), n, params);
    set_num_threads(2);
    dropout_forward(y2.data(), m2.data(), x.data(), n, params);
    dropout_backward(dx2.data(), x.data(), m2.data(), n, params);
    set_num_threads(before);
    CHECK(m1 == m2);
    CHECK(same_bits(y1, y2));
    CHECK(same_bits(dx1, dx2));
}

// ---- validation ----------------------------------------------------------------------------

TEST_CASE("validation: avg_pool2d and dropout parameters") {
    CHECK_THROWS(pool2d_dims("avg_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 2, 0}),
                 "[avg_pool2d] padding: expected at most half the kernel size (2, 2), got (2, 0)");
    CHECK_THROWS(pool2d_dims("avg_pool2d", {0, 1, 4, 4}, {2, 2, 2, 2, 0, 0}),
                 "[avg_pool2d] input: expected every dim >= 1, got shape (0, 1, 4, 4)");
    CHECK_THROWS(
        avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 4, 4}, {2, 2, 2, 2, 0, 0}),
        "[avg_pool2d_backward] x_shape: expected 4 dims (N, C, H, W), got shape (1, 4, 4)");
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 2}, {1, 1, 3, 3}, {5, 5, 1, 1, 0, 0}),
                 "[avg_pool2d_backward] x_shape: expected padded size (3, 3) >= kernel size "
                 "(5, 5), got x_shape (1, 1, 3, 3)");
    CHECK_THROWS(avg_pool2d_backward_dims({1, 1, 2, 3}, {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0}),
                 "[avg_pool2d_backward] doutput: expected shape (1, 1, 2, 2) (the forward "
                 "output's), got shape (1, 1, 2, 3)");
    const auto d = avg_pool2d_backward_dims({2, 3, 2, 2}, {2, 3, 5, 5}, {3, 3, 2, 2, 0, 0});
    CHECK(d.N == 2 && d.C == 3 && d.H == 5 && d.W == 5 && d.P == 2 && d.Q == 2);

    CHECK_THROWS(dropout_params("dropout", -0.5),
                 "[dropout] p: expected a probability in [0, 1], got -0.5");
    CHECK_THROWS(dropout_params("dropout", 1.5), "got 1.5");
    CHECK_THROWS(dropout_params("dropout_backward", 1.1),
                 "[dropout_backward] p: expected a probability in [0, 1], got 1.1");
    CHECK_THROWS(dropout_params("dropout", std::numeric_limits<double>::quiet_NaN()), "got nan");
    CHECK_THROWS(dropout_params("dropout", std::numeric_limits<double>::infinity()), "got inf");
    CHECK(dropout_params("dropout", 0.0).p == 0.0);
    CHECK(dropout_params("dropout", 1.0, 5).seed == 5);
}
