// Trains the derivation's 15-parameter network with cnnbp's C++ kernels:
//
//   X (6x6) --conv W1 (3x3) + B1--> Z1 (4x4) --ReLU--> A1 --maxpool 2x2/2--> P1 (2x2)
//     --flatten--> F (4) --F.W2 + B2--> Z2 --sigmoid--> A2 --BCE(Y)--> L
//
// Usage: train_seed_network [values.txt] [learning_rate] [steps]
// values.txt holds 52 numbers: X (36, row-major), W1 (9), B1, W2 (4), B2, Y. Without it a
// built-in example runs. Prints the loss before each SGD step and after the last, then the
// gradients of the first step, and checks them against central finite differences (exit
// status 1 if they disagree).
#include <cmath>
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Values = std::vector<double>;

struct Network {
    Values X = Values(36), W1 = Values(9), B1 = Values(1), W2 = Values(4), B2 = Values(1);
    Values Y = Values(1);
};

struct Gradients {
    Values W1 = Values(9), B1 = Values(1), W2 = Values(4), B2 = Values(1), X = Values(36);
};

const cnnbp::Conv2dDims kConv = cnnbp::conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, {});
const cnnbp::Pool2dDims kPool = cnnbp::pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
const cnnbp::LinearDims kLinear = cnnbp::linear_dims({1, 4}, {1, 4}, nullptr);

// One forward pass; with `grads`, the backward pass too. Returns L.
double step(const Network& net, Gradients* grads) {
    Values Z1(16), A1(16), P1(4), Z2(1), A2(1);
    std::vector<int64_t> argmax(4);
    cnnbp::conv2d_forward(Z1.data(), net.X.data(), net.W1.data(), net.B1.data(), kConv);
    cnnbp::relu_forward(A1.data(), Z1.data(), 16);
    cnnbp::max_pool2d_forward(P1.data(), argmax.data(), A1.data(), kPool);
    // F is P1 read as a (1, 4) row: flattening moves no numbers
    cnnbp::linear_forward(Z2.data(), P1.data(), net.W2.data(), net.B2.data(), kLinear);
    cnnbp::sigmoid_forward(A2.data(), Z2.data(), 1);
    const double L = cnnbp::binary_cross_entropy_forward(A2.data(), net.Y.data(), 1);
    if (!grads) return L;

    Values dA2(1), dZ2(1), dF(4), dA1(16), dZ1(16);
    cnnbp::binary_cross_entropy_backward(dA2.data(), A2.data(), net.Y.data(), 1);
    cnnbp::sigmoid_backward(dZ2.data(), dA2.data(), A2.data(), 1);  // = A2 - Y
    cnnbp::linear_backward(dF.data(), grads->W2.data(), grads->B2.data(), dZ2.data(), P1.data(),
                           net.W2.data(), kLinear);
    cnnbp::max_pool2d_backward(dA1.data(), dF.data(), argmax.data(), kPool);
    cnnbp::relu_backward(dZ1.data(), dA1.data(), Z1.data(), 16);
    cnnbp::conv2d_backward(grads->X.data(), grads->W1.data(), grads->B1.data(), dZ1.data(),
                           net.X.data(), net.W1.data(), kConv);
    return L;
}

Network read_values(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    Network net;
    for (Values* part : {&net.X, &net.W1, &net.B1, &net.W2, &net.B2, &net.Y})
        for (double& v : *part)
            if (!(in >> v)) throw std::runtime_error(path + ": expected 52 numbers");
    return net;
}

Network built_in() {
    Network net;
    for (int i = 0; i < 36; ++i) net.X[i] = std::sin(0.7 * i + 0.3);
    for (int i = 0; i < 9; ++i) net.W1[i] = 0.3 * std::cos(1.3 * i);
    net.B1[0] = 0.1;
    net.W2 = {0.5, -0.3, 0.4, 0.2};
    net.B2[0] = -0.1;
    net.Y[0] = 1.0;
    return net;
}

void print(const char* name, const Values& values) {
    std::printf("%s", name);
    for (double v : values) std::printf(" %.17g", v);
    std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Network net = argc > 1 ? read_values(argv[1]) : built_in();
        const double lr = argc > 2 ? std::stod(argv[2]) : 0.5;
        const int steps = argc > 3 ? std::stoi(argv[3]) : 5;

        Gradients first;
        step(net, &first);

        // gradient descent; the loss is printed before each update and after the last
        for (int s = 0; s <= steps; ++s) {
            Gradients g;
            const double L = step(net, s < steps ? &g : nullptr);
            std::printf("step %d: L = %.17g\n", s, L);
            if (s == steps) break;
            for (auto [param, grad] : {std::pair{&net.W1, &g.W1}, std::pair{&net.B1, &g.B1},
                                       std::pair{&net.W2, &g.W2}, std::pair{&net.B2, &g.B2}})
                for (size_t i = 0; i < param->size(); ++i) (*param)[i] -= lr * (*grad)[i];
        }

        print("dL/dW1", first.W1);
        print("dL/dB1", first.B1);
        print("dL/dW2", first.W2);
        print("dL/dB2", first.B2);
        print("dL/dX", first.X);

        // every gradient of the first step against central differences of L
        Network probe = argc > 1 ? read_values(argv[1]) : built_in();
        const double h = 1e-6;
        double worst = 0;
        for (auto [param, grad] : {std::pair{&probe.W1, &first.W1}, std::pair{&probe.B1, &first.B1},
                                   std::pair{&probe.W2, &first.W2}, std::pair{&probe.B2, &first.B2},
                                   std::pair{&probe.X, &first.X}})
            for (size_t i = 0; i < param->size(); ++i) {
                const double saved = (*param)[i];
                (*param)[i] = saved + h;
                const double plus = step(probe, nullptr);
                (*param)[i] = saved - h;
                const double minus = step(probe, nullptr);
                (*param)[i] = saved;
                const double numeric = (plus - minus) / (2 * h);
                worst = std::max(
                    worst, std::abs(numeric - (*grad)[i]) / std::max(1e-3, std::abs(numeric)));
            }
        std::printf("finite differences: worst relative error %.2e\n", worst);
        return worst < 1e-5 ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train_seed_network: %s\n", e.what());
        return 2;
    }
}
