// The training step of the derivation's 15-parameter network from C++ (batch 1, float32):
// zero_grad, forward, BCE loss, backward, SGD update through cnnbp::nn::train_step.
// Prints the median over rounds of the mean time per step.
//   cmake -S . -B build -DCNNBP_BUILD_BENCHMARKS=ON && cmake --build build
//   build/benchmarks/cnnbp_bench_step
#include <algorithm>
#include <chrono>
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <memory>
#include <vector>

int main() {
    using namespace cnnbp::nn;
    manual_seed(0);
    Sequential<float> model;
    model.add(std::make_unique<Conv2d<float>>(1, 1, 3))
        .add(std::make_unique<ReLU<float>>())
        .add(std::make_unique<MaxPool2d<float>>(2))
        .add(std::make_unique<Flatten<float>>())
        .add(std::make_unique<Linear<float>>(4, 1))
        .add(std::make_unique<Sigmoid<float>>());
    std::vector<float> pixels(36);
    for (int i = 0; i < 36; ++i) pixels[size_t(i)] = float((i * 37 % 11) - 5) / 5.0f;
    const Tensor<float> x({1, 1, 6, 6}, pixels), y({1, 1}, std::vector<float>{1.0f});
    BCELoss<float> loss;
    SGD<float> sgd(model.parameters(), 0.01);

    const int per_round = 20000, rounds = 15;
    std::vector<double> us;
    double last = 0;
    for (int r = 0; r < rounds; ++r) {
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < per_round; ++i) last = train_step(model, x, y, loss, sgd);
        const std::chrono::duration<double, std::micro> took =
            std::chrono::steady_clock::now() - start;
        us.push_back(took.count() / per_round);
    }
    std::sort(us.begin(), us.end());
    std::printf("training step, seed network, N=1, C++: %.3f us (median of %d rounds; loss %.4f)\n",
                us[us.size() / 2], rounds, last);
}
