// The derivation's 15-parameter network, chained from the kernels in C++:
// X (6x6) -conv W1 (3x3) + B1-> Z1 (4x4) -ReLU-> A1 -maxpool 2x2/2-> P1 (2x2) -flatten-> F (4)
// -F.W2 + B2-> Z2 -sigmoid-> A2 -BCE(Y)-> L. Checks the derivation's identities and every
// parameter gradient against central finite differences.
#include <array>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using V = std::vector<double>;

namespace {

struct SeedNetwork {
    V X{0.3,  -1.2, 0.8,  0.5,  -0.7, 1.1,  1.4, 0.2,  -0.6, 0.9,  0.1,  -0.4,
        -0.9, 0.7,  1.3,  -0.2, 0.6,  0.4,  0.5, -0.3, 0.2,  1.2,  -1.1, 0.8,
        -0.5, 1.0,  -0.8, 0.3,  0.9,  -0.6, 0.7, -0.1, 0.4,  -1.3, 0.5,  1.1};  // (1, 1, 6, 6)
    V W1{0.2, -0.5, 0.3, 0.4, 0.1, -0.3, -0.2, 0.6, 0.25};                      // (1, 1, 3, 3)
    V B1{0.05};
    V W2{0.7, -0.4, 0.5, 0.3};  // (1, 4)
    V B2{-0.1};
    V Y{1.0};
    Conv2dDims conv = conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, {});
    Pool2dDims pool = pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
    LinearDims fc = linear_dims({1, 4}, {1, 4}, nullptr);

    // forward intermediates
    V Z1 = V(16), A1 = V(16), P1 = V(4), Z2 = V(1), A2 = V(1);
    std::vector<int64_t> argmax = std::vector<int64_t>(4);

    double forward() {
        conv2d_forward(Z1.data(), X.data(), W1.data(), B1.data(), conv);
        relu_forward(A1.data(), Z1.data(), 16);
        max_pool2d_forward(P1.data(), argmax.data(), A1.data(), pool);
        linear_forward(Z2.data(), P1.data(), W2.data(), B2.data(), fc);  // F is P1 flattened
        sigmoid_forward(A2.data(), Z2.data(), 1);
        return binary_cross_entropy_forward(A2.data(), Y.data(), 1);
    }
};

}  // namespace

TEST_CASE("network: derivation identities and finite differences of all 15 parameters") {
    SeedNetwork net;
    const double L = net.forward();
    CHECK(L > 0);

    V dA2(1), dZ2(1), dF(4), dW2(4), dB2(1), dA1(16), dZ1(16), dW1(9), dB1(1), dX(36);
    binary_cross_entropy_backward(dA2.data(), net.A2.data(), net.Y.data(), 1);
    sigmoid_backward(dZ2.data(), dA2.data(), net.A2.data(), 1);
    // dL/dZ2 = A2 - Y: sigmoid and binary cross-entropy together
    CHECK_CLOSE(dZ2.data(), (V{net.A2[0] - net.Y[0]}), 1e-15, 1e-12);
    linear_backward(dF.data(), dW2.data(), dB2.data(), dZ2.data(), net.P1.data(), net.W2.data(),
                    net.fc);
    // dL/dW2 = (A2 - Y) F^T, dL/dB2 = A2 - Y, dL/dF = W2^T (A2 - Y)
    for (int i = 0; i < 4; ++i) {
        CHECK_CLOSE(&dW2[i], (V{dZ2[0] * net.P1[i]}), 1e-15, 1e-12);
        CHECK_CLOSE(&dF[i], (V{net.W2[i] * dZ2[0]}), 1e-15, 1e-12);
    }
    CHECK_CLOSE(dB2.data(), dZ2, 0, 0);
    max_pool2d_backward(dA1.data(), dF.data(), net.argmax.data(), net.pool);
    // the max-pool gradient lands only on the argmax cells
    for (int64_t i = 0; i < 16; ++i) {
        bool chosen = false;
        for (int64_t a : net.argmax) chosen = chosen || a == i;
        if (!chosen) CHECK(dA1[i] == 0);
    }
    relu_backward(dZ1.data(), dA1.data(), net.Z1.data(), 16);
    conv2d_backward(dX.data(), dW1.data(), dB1.data(), dZ1.data(), net.X.data(), net.W1.data(),
                    net.conv);
    // dL/dB1 = sum(dL/dZ1); dL/dW1 = conv(X, dL/dZ1) (X as input, dL/dZ1 as a 4x4 filter)
    double sum_dZ1 = 0;
    for (double v : dZ1) sum_dZ1 += v;
    CHECK_CLOSE(dB1.data(), (V{sum_dZ1}), 1e-15, 1e-12);
    V conv_X_dZ1(9);
    conv2d_forward(conv_X_dZ1.data(), net.X.data(), dZ1.data(), (const double*)nullptr,
                   conv2d_dims({1, 1, 6, 6}, {1, 1, 4, 4}, nullptr, {}));
    CHECK_CLOSE(dW1.data(), conv_X_dZ1, 1e-15, 1e-12);

    // every one of the 15 parameters against central finite differences of L
    const double h = 1e-6;
    std::array<std::pair<V*, V*>, 4> params{
        {{&net.W1, &dW1}, {&net.B1, &dB1}, {&net.W2, &dW2}, {&net.B2, &dB2}}};
    int probed = 0;
    for (auto [values, grad] : params) {
        for (size_t i = 0; i < values->size(); ++i) {
            const double saved = (*values)[i];
            (*values)[i] = saved + h;
            const double plus = net.forward();
            (*values)[i] = saved - h;
            const double minus = net.forward();
            (*values)[i] = saved;
            CHECK_CLOSE(&(*grad)[i], (V{(plus - minus) / (2 * h)}), 1e-9, 1e-6);
            ++probed;
        }
    }
    CHECK(probed == 15);
}
