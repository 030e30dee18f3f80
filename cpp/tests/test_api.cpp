// The C++ API as a program uses it: one call at a time per object (another thread's call
// is refused, never a crash), the exception types, Sequential from a list, optimizer state
// through model files, the learning-rate schedules, .npz data, argmax and accuracy.
#include <atomic>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <thread>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using namespace cnnbp::nn;
using V = std::vector<double>;

namespace {

std::vector<float> random_floats(size_t n, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<float> out(n);
    for (auto& v : out) v = u(gen);
    return out;
}

std::shared_ptr<Sequential<float>> small_cnn() {
    return std::make_shared<Sequential<float>>(std::vector<std::shared_ptr<Layer<float>>>{
        std::make_shared<Conv2d<float>>(Conv2dOptions(1, 8, 3).padding(1)),
        std::make_shared<ReLU<float>>(), std::make_shared<MaxPool2d<float>>(2),
        std::make_shared<Flatten<float>>(), std::make_shared<Linear<float>>(8 * 8 * 8, 10)});
}

// every parameter's values, in order
std::vector<float> parameter_values(Container<float>& model) {
    std::vector<float> out;
    for (Parameter<float>* p : model.parameters())
        out.insert(out.end(), p->value.data.begin(), p->value.data.end());
    return out;
}

}  // namespace

TEST_CASE("api: one model called from two threads at once: one call throws, nothing crashes") {
    manual_seed(3);
    auto model = small_cnn();
    CrossEntropyLoss<float> loss;
    SGD<float> sgd(model->parameters(), 0.01, 0.9);
    const Tensor<float> x({16, 1, 16, 16}, random_floats(16 * 256, 1));
    Tensor<int64_t> y({16});
    for (int64_t i = 0; i < 16; ++i) y.data[size_t(i)] = i % 10;
    std::atomic<int> refused{0}, wrong{0};
    for (int round = 0; round < 50; ++round) {
        std::atomic<int> ready{0};
        auto work = [&] {
            ++ready;
            while (ready < 2) {
            }
            for (int i = 0; i < 3; ++i) try {
                    train_step(*model, x, y, loss, sgd);
                } catch (const std::logic_error& e) {
                    const std::string what = e.what();
                    ++(what.rfind("[Sequential] in use by another thread", 0) == 0 ? refused
                                                                                   : wrong);
                }
        };
        std::thread a(work), b(work);
        a.join();
        b.join();
    }
    CHECK(refused > 0);
    CHECK(wrong == 0);
    // the model is intact: a call after the threads works and is finite
    for (float v : model->forward(x).data) CHECK(std::isfinite(v));

    // one layer, and one loss, from two threads: refused with their own names
    Conv2d<float> conv(Conv2dOptions(1, 16, 5).padding(2));
    std::atomic<int> conv_refused{0};
    for (int round = 0; round < 20; ++round) {
        auto work = [&] {
            for (int i = 0; i < 3; ++i) try {
                    conv.forward(x);
                } catch (const std::logic_error& e) {
                    CHECK(std::string(e.what()).rfind("[Conv2d] in use by another thread", 0) == 0);
                    ++conv_refused;
                }
        };
        std::thread a(work), b(work);
        a.join();
        b.join();
    }
    CHECK(conv_refused > 0);
    // separate models in separate threads are never refused
    auto other = small_cnn();
    CrossEntropyLoss<float> other_loss;
    SGD<float> other_sgd(other->parameters(), 0.01);
    std::thread a([&] {
        for (int i = 0; i < 5; ++i) train_step(*model, x, y, loss, sgd);
    });
    std::thread b([&] {
        for (int i = 0; i < 5; ++i) train_step(*other, x, y, other_loss, other_sgd);
    });
    a.join();
    b.join();
}

TEST_CASE("api: exception types: bad argument, bad index, call out of order, file") {
    Sequential<float> model;
    for (int i = 0; i < 12; ++i) model.add(std::make_shared<ReLU<float>>());
    CHECK_THROWS_AS(model[99], std::out_of_range, "[Sequential] index: expected < 12, got 99");
    CHECK_THROWS_AS(model.at(12), std::out_of_range, "[Sequential] index: expected < 12, got 12");
    CHECK_THROWS_AS(model.layer(12), std::out_of_range, "[Sequential] index: expected < 12");
    CHECK(&model[11] == model.layer(11).get());
    Concat<float> pair({std::make_shared<ReLU<float>>(), std::make_shared<Tanh<float>>()});
    CHECK_THROWS_AS(pair.branch(2), std::out_of_range, "[Concat] index: expected < 2, got 2");

    const Tensor<float> dy({2, 3});
    Linear<float> linear(4, 3);
    CHECK_THROWS_AS(linear.backward(dy), std::logic_error,
                    "[Linear] backward called before forward");
    CrossEntropyLoss<float> loss;
    CHECK_THROWS_AS(loss.backward(), std::logic_error,
                    "[CrossEntropyLoss] backward called before forward");
    CHECK_THROWS_AS(linear.forward(dy), std::invalid_argument,
                    "[linear] weight: expected in_features");
    SGD<float> sgd({&linear.weight}, 0.1);
    CHECK_THROWS_AS(StepLR<float>(sgd, 0), std::invalid_argument,
                    "[StepLR] step_size: expected an int >= 1, got 0");
    Sequential<float> saved({std::make_shared<Linear<float>>(2, 2)});
    CHECK_THROWS_AS(save(saved, "no-such-directory/model.npz"), io_error, "[save]");
    CHECK_THROWS_AS(load<float>("no-such-file.npz"), std::invalid_argument, "[load] file:");
}

TEST_CASE("api: Sequential from a list of layers equals one built by add()") {
    manual_seed(5);
    auto listed = small_cnn();
    manual_seed(5);
    Sequential<float> added;
    added.add(std::make_unique<Conv2d<float>>(Conv2dOptions(1, 8, 3).padding(1)))
        .add(std::make_unique<ReLU<float>>())
        .add(std::make_unique<MaxPool2d<float>>(2))
        .add(std::make_unique<Flatten<float>>())
        .add(std::make_unique<Linear<float>>(8 * 8 * 8, 10));
    CHECK(listed->size() == 5 && listed->layer(0)->type() == "Conv2d");
    CHECK(parameter_values(*listed) == parameter_values(added));
    // unique_ptrs convert; a null layer is refused as add() refuses it
    Sequential<double> owned({std::make_unique<Linear<double>>(2, 3)});
    CHECK(owned.size() == 1);
    CHECK_THROWS(Sequential<double>({nullptr}), "[Sequential] layer: expected a layer, got null");
}

TEST_CASE("api: an optimizer restored from a model file continues as the original") {
    const Tensor<float> x({16, 1, 16, 16}, random_floats(16 * 256, 7));
    Tensor<int64_t> y({16});
    for (int64_t i = 0; i < 16; ++i) y.data[size_t(i)] = (i * 7) % 10;
    for (const std::string kind : {"SGD", "Adam"}) {
        manual_seed(9);
        auto model = small_cnn();
        std::shared_ptr<Optimizer<float>> opt;
        if (kind == "SGD")
            opt = std::make_shared<SGD<float>>(model->parameters(), 0.05, 0.9, 1e-3);
        else
            opt = std::make_shared<Adam<float>>(model->parameters(), 1e-3);
        CrossEntropyLoss<float> loss;
        for (int i = 0; i < 3; ++i) train_step(*model, x, y, loss, *opt);
        const std::string path = "cnnbp_test_checkpoint.npz";
        save(*model, path, opt.get());
        Checkpoint<float> restored = load_checkpoint<float>(path);
        std::remove(path.c_str());
        CHECK(restored.optimizer && restored.optimizer->type() == kind);
        CHECK(parameter_values(restored.model) == parameter_values(*model));
        CrossEntropyLoss<float> restored_loss;
        for (int i = 0; i < 3; ++i) {
            const double a = train_step(*model, x, y, loss, *opt);
            const double b = train_step(restored.model, x, y, restored_loss, *restored.optimizer);
            CHECK(a == b);
        }
        CHECK(parameter_values(restored.model) == parameter_values(*model));
    }
}

TEST_CASE("api: StepLR and CosineAnnealingLR give Python's (torch's) rates") {
    Parameter<float> p;
    SGD<float> sgd({&p}, 0.05);
    StepLR<float> step(sgd, 3, 0.1);
    V got;
    for (int i = 0; i < 10; ++i) step.step(), got.push_back(sgd.lr());
    CHECK_CLOSE(got.data(),
                V({0.05, 0.05, 0.005000000000000001, 0.005000000000000001, 0.005000000000000001,
                   0.0005000000000000001, 0.0005000000000000001, 0.0005000000000000001,
                   5.0000000000000016e-05, 5.0000000000000016e-05}),
                0, 0);
    Adam<float> adam({&p}, 0.1);
    CosineAnnealingLR<float> cosine(adam, 5, 0.001);
    got.clear();
    for (int i = 0; i < 12; ++i) cosine.step(), got.push_back(cosine.get_last_lr());
    CHECK_CLOSE(
        got.data(),
        V({0.0905463412215599, 0.06579634122155989, 0.035203658778440096, 0.010453658778440105,
           0.001, 0.010453658778440102, 0.03520365877844012, 0.06579634122155993,
           0.09054634122155995, 0.10000000000000005, 0.09054634122155998, 0.06579634122155995}),
        0, 0);
    CHECK(cosine.last_epoch() == 12 && cosine.base_lr() == 0.1);
    CHECK_THROWS(CosineAnnealingLR<float>(adam, 0), "[CosineAnnealingLR] T_max: expected");
}

TEST_CASE("api: NpzFile reads arrays as tensors; argmax and accuracy") {
    manual_seed(2);
    Sequential<double> model({std::make_shared<Linear<double>>(3, 2)});
    const std::string path = "cnnbp_test_arrays.npz";
    save(model, path);
    NpzFile file(path);
    std::remove(path.c_str());
    CHECK(file.contains("0.weight") && !file.contains("x"));
    CHECK(file.names() == std::vector<std::string>({"0.bias", "0.weight", "architecture"}));
    const Tensor<double> w = file.tensor<double>("0.weight");
    CHECK(w.shape == Shape({2, 3}) && w.data == model.parameters()[0]->value.data);
    const Tensor<float> w32 = file.tensor<float>("0.weight");
    CHECK(w32.data[4] == float(w.data[4]));
    const Tensor<int64_t> text = file.tensor<int64_t>("architecture");  // uint8 -> int64
    CHECK(text.size() > 0 && text.data[0] == '{');
    CHECK_THROWS(file.tensor<int64_t>("0.weight"), "[load] 0.weight: expected integers, got");
    CHECK_THROWS(file.tensor<float>("x"), "[load] x: expected one of the arrays of");
    CHECK_THROWS(NpzFile("no-such-file.npz"), "[load] file:");

    const double nan = std::nan("");
    const Tensor<double> scores({4, 3}, {0, 2, 1, 5, 5, 1, -1, nan, 3, 0, 0, 0});
    CHECK(argmax(scores).data == std::vector<int64_t>({1, 0, 1, 0}));
    CHECK(accuracy(scores, Tensor<int64_t>({4}, {1, 1, 1, 0})) == 0.75);
    CHECK(accuracy(Tensor<float>({0, 3}), Tensor<int64_t>({0})) == 0.0);
    CHECK_THROWS(accuracy(scores, Tensor<int64_t>({3})),
                 "[accuracy] labels: expected shape (4,) (one per row of scores), got shape (3,)");
    CHECK_THROWS(argmax(Tensor<float>({3})), "[argmax] scores: expected 2 dims (N, K)");
}
