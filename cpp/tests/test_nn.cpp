// The C++ model API: layers, Sequential, losses, optimizers and the per-layer trace.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>

#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;
using namespace cnnbp::nn;
using V = std::vector<double>;

namespace {

// The derivation's network with given weights (Conv2d 1->1 3x3, ReLU, MaxPool 2, Flatten,
// Linear 4->1, Sigmoid).
Sequential<double> seed_network(const V& W1, double B1, const V& W2, double B2) {
    Sequential<double> model;
    auto conv = std::make_unique<Conv2d<double>>(1, 1, 3);
    conv->weight.value.data = W1;
    conv->bias.value.data = {B1};
    auto fc = std::make_unique<Linear<double>>(4, 1);
    fc->weight.value.data = W2;
    fc->bias.value.data = {B2};
    model.add(std::move(conv))
        .add(std::make_unique<ReLU<double>>())
        .add(std::make_unique<MaxPool2d<double>>(2))
        .add(std::make_unique<Flatten<double>>())
        .add(std::move(fc))
        .add(std::make_unique<Sigmoid<double>>());
    return model;
}

V values(size_t count, unsigned seed, double scale = 1.0) {
    return cnnbp_test::random_values(count, seed, scale);
}

// Every parameter gradient of the last backward against central differences of objective().
template <typename Objective>
void check_against_differences(Sequential<double>& model, const Objective& objective) {
    const double h = 1e-6;
    for (auto& [name, p] : model.named_parameters()) {
        V numeric(p->value.data.size());
        for (size_t i = 0; i < numeric.size(); ++i) {
            const double saved = p->value.data[i];
            p->value.data[i] = saved + h;
            const double plus = objective();
            p->value.data[i] = saved - h;
            const double minus = objective();
            p->value.data[i] = saved;
            numeric[i] = (plus - minus) / (2 * h);
        }
        CHECK_CLOSE(p->grad.data.data(), numeric, 1e-8, 1e-5);
    }
}

}  // namespace

TEST_CASE("nn: the seed network through the model API equals the kernel chain") {
    const V X = values(36, 1), W1 = values(9, 2, 0.5), W2 = values(4, 3, 0.8);
    auto model = seed_network(W1, 0.05, W2, -0.1);
    CHECK(model.named_parameters().size() == 4);
    CHECK(model.named_parameters()[2].first == "4.weight");
    const Tensor<double> x({1, 1, 6, 6}, X), y({1, 1}, V{1.0});
    BCELoss<double> loss;
    const double L = loss.forward(model.forward(x), y);
    model.backward(loss.backward());

    // the same step chained from the kernels
    const auto conv = conv2d_dims({1, 1, 6, 6}, {1, 1, 3, 3}, nullptr, {});
    const auto pool = pool2d_dims("max_pool2d", {1, 1, 4, 4}, {2, 2, 2, 2, 0, 0});
    const auto fc = linear_dims({1, 4}, {1, 4}, nullptr);
    V Z1(16), A1(16), P1(4), Z2(1), A2(1), B1{0.05}, B2{-0.1}, Y{1.0};
    std::vector<int64_t> idx(4);
    conv2d_forward(Z1.data(), X.data(), W1.data(), B1.data(), conv);
    relu_forward(A1.data(), Z1.data(), 16);
    max_pool2d_forward(P1.data(), idx.data(), A1.data(), pool);
    linear_forward(Z2.data(), P1.data(), W2.data(), B2.data(), fc);
    sigmoid_forward(A2.data(), Z2.data(), 1);
    CHECK_CLOSE(&L, (V{binary_cross_entropy_forward(A2.data(), Y.data(), 1)}), 0, 1e-15);
    V dA2(1), dZ2(1), dF(4), dW2(4), dB2(1), dA1(16), dZ1(16), dX(36), dW1(9), dB1(1);
    binary_cross_entropy_backward(dA2.data(), A2.data(), Y.data(), 1);
    sigmoid_backward(dZ2.data(), dA2.data(), A2.data(), 1);
    linear_backward(dF.data(), dW2.data(), dB2.data(), dZ2.data(), P1.data(), W2.data(), fc);
    max_pool2d_backward(dA1.data(), dF.data(), idx.data(), pool);
    relu_backward(dZ1.data(), dA1.data(), Z1.data(), 16);
    conv2d_backward(dX.data(), dW1.data(), dB1.data(), dZ1.data(), X.data(), W1.data(), conv);

    auto params = model.parameters();
    CHECK_CLOSE(params[0]->grad.data.data(), dW1, 0, 1e-15);
    CHECK_CLOSE(params[1]->grad.data.data(), dB1, 0, 1e-15);
    CHECK_CLOSE(params[2]->grad.data.data(), dW2, 0, 1e-15);
    CHECK_CLOSE(params[3]->grad.data.data(), dB2, 0, 1e-15);
    CHECK_CLOSE(model.grad_input().data.data(), dX, 0, 1e-15);
    // the trace: every intermediate, by layer
    CHECK_CLOSE(model[0].output().data.data(), Z1, 0, 1e-15);
    CHECK_CLOSE(model[4].grad_input().data.data(), dF, 0, 1e-15);
    CHECK_CLOSE(model[1].grad_input().data.data(), dZ1, 0, 1e-15);
}

TEST_CASE("nn: the trace links the layers; gradients accumulate until zero_grad") {
    auto model = seed_network(values(9, 4, 0.5), 0.1, values(4, 5), 0.2);
    const Tensor<double> x({2, 1, 6, 6}, values(72, 6)), y({2, 1}, V{1.0, 0.0});
    BCELoss<double> loss;
    loss.forward(model.forward(x), y);
    model.backward(loss.backward());
    CHECK(model[0].input() == &x);
    for (size_t i = 0; i + 1 < model.size(); ++i) {
        CHECK(model[i + 1].input() == &model[i].output());            // output i is input i + 1
        CHECK(model[i].grad_output() == &model[i + 1].grad_input());  // and back again
    }
    const V once = model.parameters()[0]->grad.data;
    loss.forward(model.forward(x), y);
    model.backward(loss.backward());
    V twice(once.size());
    for (size_t i = 0; i < once.size(); ++i) twice[i] = 2 * once[i];
    CHECK_CLOSE(model.parameters()[0]->grad.data.data(), twice, 1e-15, 1e-14);
    model.zero_grad();
    for (auto* p : model.parameters()) CHECK(!p->has_grad());
}

TEST_CASE("nn: the flat buffer holds the parameters and gradients in named order") {
    auto model = seed_network(values(9, 4, 0.5), 0.1, values(4, 5), 0.2);
    const int64_t n = flat_size(model);
    CHECK(n == 15 && flat_buffer_size(model) == 0);
    V flat(n), expected;
    for (auto& named : model.named_parameters())
        expected.insert(expected.end(), named.second->value.data.begin(),
                        named.second->value.data.end());
    pack_parameters(flat.data(), n, model);
    CHECK(flat == expected);
    pack_gradients(flat.data(), n, model);  // no gradients yet: zeros
    CHECK(std::all_of(flat.begin(), flat.end(), [](double v) { return v == 0; }));
    const Tensor<double> x({2, 1, 6, 6}, values(72, 6)), y({2, 1}, V{1.0, 0.0});
    BCELoss<double> loss;
    loss.forward(model.forward(x), y);
    model.backward(loss.backward());
    pack_gradients(flat.data(), n, model);
    CHECK(flat[0] == model.parameters()[0]->grad.data[0] && flat[14] != 0);
    for (double& v : flat) v *= 2;
    unpack_gradients(model, flat.data(), n);
    CHECK(model.parameters()[3]->grad.data[0] == flat[14]);
    unpack_parameters(model, flat.data(), n);
    CHECK(model.parameters()[0]->value.data[8] == flat[8]);
    CHECK_THROWS(pack_gradients(flat.data(), 14, model),
                 "[pack_gradients] flat: expected 15 elements, got 14");
    CHECK_THROWS(unpack_parameters(model, flat.data(), 16),
                 "[unpack_parameters] flat: expected 15 elements, got 16");
}

TEST_CASE("nn: parameter gradients of a strided model against finite differences") {
    // seeded: weights drawn afresh each run put a probe across a ReLU kink or a max-pool tie
    // about 3 runs in 10,000 (measured)
    manual_seed(12);
    Sequential<double> model;
    model.add(std::make_unique<Conv2d<double>>(Conv2dOptions(2, 3, 3).stride(2).padding(1)))
        .add(std::make_unique<ReLU<double>>())
        .add(std::make_unique<MaxPool2d<double>>(MaxPool2dOptions(2).stride(1)))
        .add(std::make_unique<Flatten<double>>())
        .add(std::make_unique<Linear<double>>(3 * 3 * 3, 4));
    const Tensor<double> x({2, 2, 7, 7}, values(196, 7));
    const Tensor<int64_t> labels({2}, {1, 3});
    CrossEntropyLoss<double> loss;
    auto objective = [&] { return loss.forward(model.forward(x), labels); };
    objective();
    model.backward(loss.backward());
    check_against_differences(model, objective);
}

TEST_CASE("nn: convolution options by name; gradients against finite differences") {
    manual_seed(4);
    Sequential<double> model;
    // 'same' with an even kernel (one more zero at the bottom), then dilated grouped and
    // depthwise convolutions
    model.add(std::make_unique<Conv2d<double>>(Conv2dOptions(2, 4, {2, 3}).padding(Padding::Same)))
        .add(std::make_unique<Conv2d<double>>(
            Conv2dOptions(4, 6, 3).dilation({2, 1}).groups(2).padding(1).bias(false)))
        .add(std::make_unique<Tanh<double>>())
        .add(std::make_unique<Conv2d<double>>(Conv2dOptions(6, 6, 3).groups(6).stride(2)))
        .add(std::make_unique<MaxPool2d<double>>(MaxPool2dOptions(2).ceil_mode(true)))
        .add(std::make_unique<Flatten<double>>())
        .add(std::make_unique<Linear<double>>(6, 3));
    const Tensor<double> x({2, 2, 7, 6}, values(168, 5));
    CHECK(model.forward(x).shape == Shape({2, 3}));
    const auto& grouped = dynamic_cast<Conv2d<double>&>(model[1]);
    CHECK(grouped.weight.value.shape == Shape({6, 2, 3, 3}));
    const Tensor<int64_t> labels({2}, {0, 2});
    CrossEntropyLoss<double> loss;
    auto objective = [&] { return loss.forward(model.forward(x), labels); };
    objective();
    model.backward(loss.backward());
    check_against_differences(model, objective);
    // torch's constructor checks, with the registry's messages
    CHECK_THROWS(Conv2d<double>(Conv2dOptions(4, 6, 3).groups(4)),
                 "[Conv2d] groups: expected a divisor of in_channels 4 and out_channels 6, got 4");
    CHECK_THROWS(Conv2d<double>(Conv2dOptions(4, 6, 3).stride(2).padding(Padding::Same)),
                 "[Conv2d] padding: expected stride 1 with padding='same' (torch's rule), got "
                 "stride (2, 2)");
    CHECK_THROWS(Conv2d<double>(Conv2dOptions(4, 6, 3).dilation(0)),
                 "[Conv2d] dilation: expected >= 1, got 0");
    CHECK_THROWS(make_layer<double>("Conv2d", {1, 1, 3}, {{"padding", "full"}}),
                 "[Conv2d] padding: expected 'same', 'valid', an int or a pair of ints, got "
                 "'full'");
    // an unbatched (C, H, W) input and an empty batch, as torch takes them
    Conv2d<double> conv(Conv2dOptions(2, 4, 3).groups(2).padding(1));
    const Tensor<double> image({2, 5, 4}, values(40, 6));
    const Tensor<double> batch({1, 2, 5, 4}, values(40, 6));
    const V unbatched = conv.forward(image).data;
    CHECK(conv.output().shape == Shape({4, 5, 4}));
    const Tensor<double> ones_out({4, 5, 4}, V(80, 1.0));
    CHECK(conv.backward(ones_out).shape == Shape({2, 5, 4}));
    CHECK(conv.forward(batch).data == unbatched);
    const Tensor<double> empty({0, 2, 5, 4}, {});
    CHECK(conv.forward(empty).shape == Shape({0, 4, 5, 4}));
    for (auto& [name, p] : conv.named_parameters()) p->clear_grad();
    const Tensor<double> empty_out({0, 4, 5, 4}, {});
    conv.backward(empty_out);
    CHECK(conv.weight.grad.data == V(conv.weight.value.data.size(), 0.0));
    Conv2d<float> valid(Conv2dOptions(1, 1, 3).padding(Padding::Valid));
    CHECK(json::dump(valid.config()).find("\"padding\": \"valid\"") != std::string::npos);
}

TEST_CASE("nn: Tanh, AvgPool2d and Dropout layers; gradients against finite differences") {
    manual_seed(5);
    Sequential<double> model;
    auto dropout = std::make_shared<Dropout<double>>(0.25, 9);
    model.add(std::make_shared<Conv2d<double>>(Conv2dOptions(2, 3, 3).padding(1)))
        .add(std::make_shared<Tanh<double>>())
        .add(std::make_shared<AvgPool2d<double>>(AvgPool2dOptions(3).stride(2).padding(1)))
        .add(dropout)
        .add(std::make_shared<Flatten<double>>())
        .add(std::make_shared<Linear<double>>(3 * 3 * 3, 4));
    const Tensor<double> x({2, 2, 6, 5}, values(120, 8));
    const Tensor<int64_t> labels({2}, {0, 2});
    CrossEntropyLoss<double> loss;
    model.eval();  // a fixed function for the finite differences
    CHECK(!dropout->is_training());
    auto objective = [&] { return loss.forward(model.forward(x), labels); };
    objective();
    CHECK(!dropout->dropped() && dropout->output().data == model[2].output().data);
    model.backward(loss.backward());
    check_against_differences(model, objective);
    // training: each forward draws a mask; kept values are scaled by 1 / (1 - p)
    model.train();
    const V first = model.forward(x).data;
    const std::vector<uint8_t> mask = dropout->mask;
    const Tensor<double>& pooled = model[2].output();
    for (size_t i = 0; i < mask.size(); ++i)
        CHECK(dropout->output().data[i] == (mask[i] ? pooled.data[i] / 0.75 : 0.0));
    model.forward(x);
    CHECK(dropout->mask != mask);
    CHECK_THROWS(Dropout<float>(1.5), "[Dropout] p: expected a probability in [0, 1]");
}

TEST_CASE("nn: SGD and Adam apply torch's update rules; train_step learns") {
    Parameter<double> p;
    p.value = Tensor<double>({3}, V{1.0, -2.0, 0.5});
    p.grad = Tensor<double>({3}, V{0.1, 0.2, -0.3});
    p.grad_set = true;
    SGD<double> sgd({&p}, 0.5, 0.9);
    sgd.step();  // first step: buffer = g, p -= lr * g
    CHECK_CLOSE(p.value.data.data(), (V{0.95, -2.1, 0.65}), 0, 1e-15);
    sgd.step();  // buffer = 0.9 * g + g
    CHECK_CLOSE(p.value.data.data(), (V{0.855, -2.29, 0.935}), 0, 1e-14);

    Parameter<double> q;
    q.value = Tensor<double>({2}, V{1.0, -1.0});
    q.grad = Tensor<double>({2}, V{0.5, -0.25});
    q.grad_set = true;
    Adam<double> adam({&q}, 0.1);
    adam.step();  // bias-corrected first step moves each value by lr * sign(g)
    CHECK_CLOSE(q.value.data.data(), (V{0.9, -0.9}), 0, 1e-7);

    // a small CNN on a fixed batch: the loss falls
    manual_seed(3);
    Sequential<float> model;
    model.add(std::make_unique<Conv2d<float>>(1, 8, 3))
        .add(std::make_unique<ReLU<float>>())
        .add(std::make_unique<MaxPool2d<float>>(2))
        .add(std::make_unique<Conv2d<float>>(8, 16, 3))
        .add(std::make_unique<ReLU<float>>())
        .add(std::make_unique<MaxPool2d<float>>(2))
        .add(std::make_unique<Flatten<float>>())
        .add(std::make_unique<Linear<float>>(400, 10));
    const V pixels = values(8 * 28 * 28, 9);
    const Tensor<float> x({8, 1, 28, 28}, std::vector<float>(pixels.begin(), pixels.end()));
    const Tensor<int64_t> labels({8}, {0, 1, 2, 3, 4, 5, 6, 7});
    CrossEntropyLoss<float> loss;
    SGD<float> opt(model.parameters(), 0.1, 0.9);
    const double first = train_step(model, x, labels, loss, opt);
    double last = first;
    for (int i = 0; i < 30; ++i) last = train_step(model, x, labels, loss, opt);
    CHECK(last < 0.5 * first);
}

TEST_CASE("nn: AdamW decays the parameter; a new learning rate applies from the next step") {
    Parameter<double> w;
    w.value = Tensor<double>({2}, V{1.0, -1.0});
    w.grad = Tensor<double>({2}, V{0.5, -0.25});
    w.grad_set = true;
    AdamW<double> adamw({&w}, 0.1, 0.9, 0.999, 1e-8, 0.5);
    adamw.step();  // p *= 1 - lr * wd, then the Adam step: lr * sign(g)
    CHECK_CLOSE(w.value.data.data(), (V{0.95 - 0.1, -0.95 + 0.1}), 0, 1e-7);
    CHECK_THROWS(AdamW<double>({&w}, 0.1, 1.0),
                 "[AdamW] betas: expected values in [0, 1), got (1.0, 0.999)");

    Parameter<double> p;
    p.value = Tensor<double>({1}, V{1.0});
    p.grad = Tensor<double>({1}, V{1.0});
    p.grad_set = true;
    SGD<double> sgd({&p}, 0.5);
    sgd.set_lr(0.25);
    sgd.step();
    CHECK(p.value.data[0] == 0.75 && sgd.lr() == 0.25);
    CHECK_THROWS(sgd.set_lr(-1.0), "[SGD] lr: expected >= 0, got -1.0");
    CHECK(number_str(0.1) == "0.1" && number_str(1e-05) == "1e-05" && number_str(2.0) == "2.0");
}

TEST_CASE("nn: shared layers and the trace that outlives a container") {
    auto relu = std::make_shared<ReLU<double>>();
    auto flatten = std::make_shared<Flatten<double>>();
    const Tensor<double> x({1, 1, 2, 2}, V{-1.0, 2.0, -3.0, 4.0});
    {
        Sequential<double> model;
        model.add(std::make_shared<Linear<double>>(2, 2)).add(relu).add(flatten);
        model.forward(x);
        CHECK(relu->input() != nullptr && flatten->input() == &relu->output());
    }
    // the Linear layer died with the container, so ReLU's input is forgotten, not dangling
    CHECK(relu->input() == nullptr && flatten->input() == nullptr);
    CHECK(relu->output().size() == 4);
    // a layer's kept input belongs to it
    relu->kept_input() = x;
    relu->forward(relu->kept_input());
    relu->forget_borrowed();
    CHECK(relu->input() == &relu->kept_input());

    // a loss keeps copies of its arguments
    BCELoss<double> loss;
    {
        const Tensor<double> a({2}, V{0.25, 0.5}), y({2}, V{0.0, 1.0});
        loss.forward(a, y);
    }
    CHECK(loss.has_run() && loss.input().data == (V{0.25, 0.5}) && loss.target().data[1] == 1.0);
    CHECK_CLOSE(&loss.backward().data[0], (V{1.0 / 0.75 / 2, -1.0 / 0.5 / 2}), 0, 1e-15);
    CrossEntropyLoss<double> ce;
    bool refused = false;
    try {
        ce.backward();
    } catch (const std::logic_error& e) {
        refused = std::string(e.what()) == "[CrossEntropyLoss] backward called before forward";
    }
    CHECK(refused);
}

TEST_CASE("nn: bad input is refused with the kernels' messages") {
    Conv2d<double> conv(2, 3, 3);
    const Tensor<double> wrong({1, 1, 6, 6});
    CHECK_THROWS(conv.forward(wrong), "[conv2d] weight: expected 1 input channels");
    CrossEntropyLoss<double> ce;
    const Tensor<double> logits({2, 3});
    const Tensor<int64_t> labels({2}, {0, 3});
    CHECK_THROWS(ce.forward(logits, labels), "[cross_entropy] labels: expected class indices");
    CHECK_THROWS(SGD<double>({}, -1.0), "[SGD] lr: expected >= 0");
    CHECK_THROWS(Linear<double>(0, 2), "[Linear] in_features: expected >= 1, got 0");
}

TEST_CASE("nn: model files round-trip and refuse damaged files") {
    manual_seed(11);
    Sequential<double> model;
    model
        .add(std::make_unique<Conv2d<double>>(
            Conv2dOptions(2, 3, {3, 2}).stride({2, 1}).padding({1, 0}).bias(true)))
        .add(std::make_unique<ReLU<double>>())
        .add(std::make_unique<MaxPool2d<double>>(2))
        .add(std::make_unique<Flatten<double>>())
        .add(std::make_unique<Linear<double>>(3 * 2 * 2, 2, false))
        .add(std::make_unique<Sigmoid<double>>());
    const Tensor<double> x({2, 2, 8, 5}, values(160, 12));
    const V expected = model.forward(x).data;
    const std::string path = "cnnbp_test_model.npz";
    save(model, path);
    CHECK(model_file_dtype(path) == "float64");
    auto loaded = load<double>(path);
    CHECK(loaded.size() == 6);
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
    CHECK_THROWS(load<float>(path), "[load] dtype: expected float32, got float64");

    // damaged copies: truncated, a flipped byte in the JSON, garbage
    std::string bytes;
    {
        std::ifstream in(path, std::ios::binary);
        bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    auto write = [&](const std::string& content) {
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out << content;
    };
    write(bytes.substr(0, bytes.size() / 2));
    CHECK_THROWS(load<double>(path), "[load] file:");
    std::string broken = bytes;
    const size_t brace = broken.find("{\"format\"");
    CHECK(brace != std::string::npos);
    broken[brace] = '[';
    write(broken);
    CHECK_THROWS(load<double>(path), "[load] architecture");
    write("not a zip file at all, just text that is long enough");
    CHECK_THROWS(load<double>(path), "[load] file:");
    std::remove(path.c_str());
}

TEST_CASE("nn: layers are made by name from the registry, and report their arguments") {
    CHECK(find_layer_type("Conv2d") != nullptr && find_layer_type("Nope") == nullptr);
    manual_seed(3);
    auto by_name = make_layer<double>("Conv2d", {2, 3, json::Array{3, 2}}, {{"padding", 1}});
    manual_seed(3);
    Conv2d<double> direct(Conv2dOptions(2, 3, {3, 2}).padding(1));
    auto& made = dynamic_cast<Conv2d<double>&>(*by_name);
    CHECK(made.weight.value.data == direct.weight.value.data);  // one generator, same draws
    CHECK(json::dump(made.config()) ==
          "{\"type\": \"Conv2d\", \"in_channels\": 2, \"out_channels\": 3, \"kernel_size\": [3, "
          "2], \"stride\": [1, 1], \"padding\": [1, 1], \"dilation\": [1, 1], \"groups\": 1, "
          "\"bias\": true}");
    auto pool = make_layer<float>("MaxPool2d", {3}, {});
    CHECK(json::dump(pool->config()) ==
          "{\"type\": \"MaxPool2d\", \"kernel_size\": [3, 3], \"stride\": [3, 3], \"padding\": "
          "[0, 0], \"dilation\": [1, 1], \"ceil_mode\": false}");
    CHECK_THROWS(make_layer<float>("Conv2d", {1, 1, 2.5}, {}),
                 "[Conv2d] kernel_size: expected an int or a pair of ints, got 2.5");
    CHECK_THROWS(make_layer<float>("Conv2d", {0, 1, 3}, {}),
                 "[Conv2d] in_channels: expected >= 1, got 0");
    CHECK_THROWS(make_layer<float>("MaxPool2d", {2}, {{"padding", 2}}),
                 "[MaxPool2d] padding: expected at most half the kernel size");
    CHECK_THROWS(make_layer<float>("Linear", {1, 2}, {{"bais", false}}),
                 "[Linear] got an unexpected argument 'bais'");
    CHECK_THROWS(make_layer<float>("Tanh", {}, {{"p", 1}}), "[Tanh] got an unexpected argument");
    CHECK_THROWS(make_layer<float>("Softplus", {}, {}), "[make_layer] type: expected one of");
    // Dropout draws its seed once and keeps it, so that copies of it agree
    auto dropout = make_layer<float>("Dropout", {0.25}, {});
    CHECK(!dropout->arguments()->values().back().second.is_null());
    CHECK(json::dump(dropout->config()) == "{\"type\": \"Dropout\", \"p\": 0.25}");
    CrossEntropyLoss<double> ce;
    CHECK_THROWS(ce.forward(Tensor<double>({2, 3}), Tensor<double>({2})),
                 "[cross_entropy] target: expected class indices (int64)");
}

TEST_CASE("nn: AdaptiveAvgPool2d computes its kernels; model files keep None sizes") {
    const Tensor<double> x({2, 3, 7, 5}, values(210, 51));
    AdaptiveAvgPool2d<double> pool(AdaptiveOutputSize{3, std::nullopt});
    CHECK(json::dump(pool.config()) ==
          "{\"type\": \"AdaptiveAvgPool2d\", \"output_size\": [3, null]}");
    const Tensor<double>& y = pool.forward(x);
    CHECK(y.shape == (Shape{2, 3, 3, 5}));
    const auto d = adaptive_pool2d_dims("adaptive_avg_pool2d", x.shape, {3, std::nullopt});
    V want(90), dwant(210);
    adaptive_avg_pool2d_forward(want.data(), x.data.data(), d);
    CHECK_CLOSE(y.data.data(), want, 0, 0);
    const Tensor<double> g({2, 3, 3, 5}, values(90, 52));
    adaptive_avg_pool2d_backward(dwant.data(), g.data.data(), d);
    CHECK_CLOSE(pool.backward(g).data.data(), dwant, 0, 0);
    const Tensor<double> wrong_grad({2, 3, 3, 4});
    CHECK_THROWS(pool.backward(wrong_grad),
                 "[adaptive_avg_pool2d_backward] doutput: expected shape");

    CHECK(json::dump(AdaptiveAvgPool2d<float>(2).config()) ==
          "{\"type\": \"AdaptiveAvgPool2d\", \"output_size\": [2, 2]}");
    auto made = make_layer<double>("AdaptiveAvgPool2d", {json::Value(json::Array{nullptr, 4})}, {});
    CHECK(dynamic_cast<AdaptiveAvgPool2d<double>&>(*made).output_size()[1] == 4);
    CHECK_THROWS(make_layer<float>("AdaptiveAvgPool2d", {0}, {}),
                 "[AdaptiveAvgPool2d] output_size: expected >= 1, got 0");
    CHECK_THROWS(make_layer<float>("AdaptiveAvgPool2d", {nullptr}, {}),
                 "[AdaptiveAvgPool2d] output_size: expected an int, or a pair of ints or None, "
                 "got None");
    CHECK_THROWS(make_layer<float>("AdaptiveAvgPool2d", {json::Value(json::Array{1, 2, 3})}, {}),
                 "[AdaptiveAvgPool2d] output_size: expected an int, or a pair of ints or None");
    CHECK_THROWS(make_layer<float>("AdaptiveAvgPool2d", {}, {}),
                 "[AdaptiveAvgPool2d] missing the argument 'output_size'");

    // a network ending in a global pool: saved, loaded, the same outputs
    manual_seed(13);
    Sequential<double> model;
    model.add(std::make_unique<Conv2d<double>>(Conv2dOptions(3, 4, 3).padding(1)))
        .add(std::make_unique<ReLU<double>>())
        .add(std::make_unique<AdaptiveAvgPool2d<double>>(AdaptiveOutputSize{std::nullopt, 2}))
        .add(std::make_unique<AdaptiveAvgPool2d<double>>(1))
        .add(std::make_unique<Flatten<double>>())
        .add(std::make_unique<Linear<double>>(4, 2));
    const V expected = model.forward(x).data;
    const std::string path = "cnnbp_test_adaptive_pool.npz";
    save(model, path);
    auto loaded = load<double>(path);
    std::remove(path.c_str());
    CHECK(loaded.size() == 6);
    CHECK(json::dump(loaded[2].config()) ==
          "{\"type\": \"AdaptiveAvgPool2d\", \"output_size\": [null, 2]}");
    CHECK(json::dump(loaded[3].config()) ==
          "{\"type\": \"AdaptiveAvgPool2d\", \"output_size\": [1, 1]}");
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
}

TEST_CASE("nn: LeakyReLU, GELU, SiLU and Identity by class and by name; model files keep them") {
    const Tensor<double> x({2, 3, 4}, values(24, 41)), g({2, 3, 4}, values(24, 42));
    const auto n = x.size();
    V want(static_cast<size_t>(n)), dwant(static_cast<size_t>(n));

    LeakyReLU<double> leaky(-0.3);
    CHECK(leaky.negative_slope() == -0.3);
    leaky_relu_forward(want.data(), x.data.data(), n, -0.3);
    CHECK_CLOSE(leaky.forward(x).data.data(), want, 0, 0);
    leaky_relu_backward(dwant.data(), g.data.data(), x.data.data(), n, -0.3);
    CHECK_CLOSE(leaky.backward(g).data.data(), dwant, 0, 0);
    CHECK(json::dump(leaky.config()) == "{\"type\": \"LeakyReLU\", \"negative_slope\": -0.3}");
    CHECK(LeakyReLU<float>().negative_slope() == 0.01);

    GELU<double> gelu("tanh");
    CHECK(gelu.approximate() == GeluApproximate::Tanh);
    gelu_forward(want.data(), x.data.data(), n, GeluApproximate::Tanh);
    CHECK_CLOSE(gelu.forward(x).data.data(), want, 0, 0);
    gelu_backward(dwant.data(), g.data.data(), x.data.data(), n, GeluApproximate::Tanh);
    CHECK_CLOSE(gelu.backward(g).data.data(), dwant, 0, 0);
    CHECK(json::dump(GELU<float>().config()) == "{\"type\": \"GELU\", \"approximate\": \"none\"}");

    SiLU<double> silu;
    silu_forward(want.data(), x.data.data(), n);
    CHECK_CLOSE(silu.forward(x).data.data(), want, 0, 0);
    silu_backward(dwant.data(), g.data.data(), x.data.data(), n);
    CHECK_CLOSE(silu.backward(g).data.data(), dwant, 0, 0);

    Identity<double> identity;
    CHECK_CLOSE(identity.forward(x).data.data(), x.data, 0, 0);
    CHECK_CLOSE(identity.backward(g).data.data(), g.data, 0, 0);
    CHECK(json::dump(identity.config()) == "{\"type\": \"Identity\"}");

    auto made = make_layer<double>("LeakyReLU", {}, {{"negative_slope", 2}});
    CHECK(dynamic_cast<LeakyReLU<double>&>(*made).negative_slope() == 2.0);
    CHECK(dynamic_cast<GELU<float>&>(*make_layer<float>("GELU", {"tanh"}, {})).approximate() ==
          GeluApproximate::Tanh);
    CHECK(make_layer<float>("SiLU", {}, {})->type() == "SiLU");
    CHECK_THROWS(make_layer<float>("GELU", {"x"}, {}),
                 "[GELU] approximate: expected 'none' or 'tanh', got 'x'");
    CHECK_THROWS(GELU<double>("Tanh"), "[GELU] approximate: expected 'none' or 'tanh', got 'Tanh'");
    CHECK_THROWS(LeakyReLU<double>(std::numeric_limits<double>::quiet_NaN()),
                 "[LeakyReLU] negative_slope: expected a finite float, got nan");
    CHECK_THROWS(make_layer<float>("Identity", {1}, {}), "[Identity] expected at most 0 arguments");

    Sequential<double> model;
    model.add(std::make_unique<LeakyReLU<double>>(0.5))
        .add(std::make_unique<GELU<double>>("tanh"))
        .add(std::make_unique<SiLU<double>>())
        .add(std::make_unique<Identity<double>>());
    const V expected = model.forward(x).data;
    const std::string path = "cnnbp_test_activations.npz";
    save(model, path);
    auto loaded = load<double>(path);
    std::remove(path.c_str());
    CHECK(loaded.size() == 4);
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
    CHECK(json::dump(loaded[1].config()) == "{\"type\": \"GELU\", \"approximate\": \"tanh\"}");
    CHECK(json::dump(loaded[0].config()) == "{\"type\": \"LeakyReLU\", \"negative_slope\": 0.5}");
}

TEST_CASE("nn: loss options, libtorch-style; gradients against finite differences") {
    manual_seed(2);
    Sequential<double> model;
    model.add(std::make_shared<Conv2d<double>>(Conv2dOptions(2, 3, 3).padding(1)));  // (N, 3, H, W)
    const Tensor<double> x({2, 2, 4, 3}, values(48, 12));
    // spatial class indices, one ignored (-100 by default)
    std::vector<int64_t> label_values(24);
    for (size_t i = 0; i < label_values.size(); ++i) label_values[i] = int64_t(i % 3);
    label_values[5] = -100;
    const Tensor<int64_t> labels({2, 4, 3}, label_values);
    CrossEntropyLoss<double> ce(CrossEntropyLossOptions()
                                    .weight(Tensor<double>({3}, V{0.5, 2.0, 1.0}))
                                    .label_smoothing(0.1)
                                    .reduction(Reduction::Sum));
    CHECK(ce.reduction() == Reduction::Sum);
    auto objective = [&] { return ce.forward(model.forward(x), labels); };
    objective();
    model.backward(ce.backward(0.5));  // dL/d(loss) = 0.5: the objective's half
    for (auto* p : model.parameters())
        for (double& g : p->grad.data) g *= 2;
    check_against_differences(model, objective);

    // reduction 'none': forward gives 0 and losses() per element; backward takes their grad
    CrossEntropyLoss<double> none(
        CrossEntropyLossOptions().ignore_index(1).reduction(Reduction::None));
    // (with ignore_index 1 the default's -100 is no label: refused, as torch)
    CHECK_THROWS(none.forward(model.forward(x), labels),
                 "[cross_entropy] labels: expected class indices in [0, 3), got -100");
    label_values[5] = 2;
    const Tensor<int64_t> labels_1({2, 4, 3}, label_values);
    CHECK(none.forward(model.forward(x), labels_1) == 0.0);
    CHECK(none.losses().shape == (Shape{2, 4, 3}));
    CHECK(none.losses().data[1] == 0.0);  // label 1 is ignored here
    CHECK_THROWS(none.backward(), "[cross_entropy_backward] grad_output: expected an array");
    const Tensor<double> g({2, 4, 3}, values(24, 13));
    auto weighted = [&] {
        none.forward(model.forward(x), labels_1);
        double sum = 0;
        for (size_t i = 0; i < g.data.size(); ++i) sum += g.data[i] * none.losses().data[i];
        return sum;
    };
    model.zero_grad();
    weighted();
    model.backward(none.backward(g));
    check_against_differences(model, weighted);
    CHECK_THROWS(none.backward(Tensor<double>({3})),
                 "[cross_entropy_backward] grad_output: expected shape (2, 4, 3)");

    // train_step refuses a loss that is not a scalar
    SGD<double> sgd(model.parameters(), 0.1);
    CHECK_THROWS(train_step(model, x, labels_1, none, sgd),
                 "[train_step] loss: expected reduction 'mean' or 'sum'");
}

TEST_CASE("nn: BCE losses with weight and pos_weight against finite differences") {
    manual_seed(13);
    Sequential<double> model;
    model.add(std::make_shared<Linear<double>>(3, 4));
    const Tensor<double> x({5, 3}, values(15, 14));
    Tensor<double> y({5, 4});
    for (size_t i = 0; i < y.data.size(); ++i) y.data[i] = double(i % 3) / 2;
    BCEWithLogitsLoss<double> loss(BCEWithLogitsLossOptions()
                                       .weight(Tensor<double>({5, 1}, V{1, 2, 0.5, 1, 3}))
                                       .pos_weight(Tensor<double>({4}, V{0.5, 1, 2, 4})));
    auto objective = [&] { return loss.forward(model.forward(x), y); };
    objective();
    model.backward(loss.backward());
    check_against_differences(model, objective);
    CHECK_THROWS(BCELoss<double>(BCELossOptions().weight(Tensor<double>({3}, V{1, 1, 1})))
                     .forward(Tensor<double>({5, 4}, 0.5), y),
                 "[binary_cross_entropy] weight: expected a shape that broadcasts to (5, 4)");
    CHECK_THROWS(CrossEntropyLoss<double>(CrossEntropyLossOptions().label_smoothing(-1)),
                 "[CrossEntropyLoss] label_smoothing: expected a number in [0, 1], got -1.0");
}

TEST_CASE("nn: Residual and Concat: values, gradients against finite differences, model files") {
    manual_seed(21);
    // y = Linear(Concat(Residual(Linear, Tanh), Residual(Linear, shortcut Linear)))
    auto block = std::make_shared<Sequential<double>>();
    block->add(std::make_shared<Linear<double>>(3, 3)).add(std::make_shared<Tanh<double>>());
    auto plain = std::make_shared<Residual<double>>(block);
    auto projected = std::make_shared<Residual<double>>(std::make_shared<Linear<double>>(3, 2),
                                                        std::make_shared<Linear<double>>(3, 2));
    auto concat = std::make_shared<Concat<double>>(
        std::vector<std::shared_ptr<Layer<double>>>{plain, projected});
    Sequential<double> model;
    model.add(concat).add(std::make_shared<Linear<double>>(5, 1));
    const Tensor<double> x({4, 3}, values(12, 22));
    const Tensor<double> y = model.forward(x);
    CHECK(y.shape == Shape({4, 1}));
    // the Residual's output is its block's plus its input; the Concat's stacks its branches
    for (int64_t i = 0; i < 12; ++i)
        CHECK(plain->output().data[size_t(i)] ==
              block->output().data[size_t(i)] + x.data[size_t(i)]);
    CHECK(concat->output().shape == Shape({4, 5}));
    CHECK(concat->output().data[3] == projected->output().data[0]);
    CHECK(concat->output().data[5] == plain->output().data[3]);

    auto names = model.named_parameters();
    CHECK(names.size() == 8);
    CHECK(names[0].first == "0.0.block.0.weight");
    CHECK(names[2].first == "0.1.block.weight");
    CHECK(names[4].first == "0.1.shortcut.weight");
    CHECK(names[6].first == "1.weight");

    // L = sum(y * c): dL/dy = c
    const V c = values(4, 23);
    auto objective = [&] {
        const Tensor<double>& out = model.forward(x);
        double L = 0;
        for (size_t i = 0; i < c.size(); ++i) L += out.data[i] * c[i];
        return L;
    };
    model.zero_grad();
    model.forward(x);
    const Tensor<double> dy({4, 1}, c);
    const V dx = model.backward(dy).data;
    check_against_differences(model, objective);
    Tensor<double> probe = x;
    V numeric(dx.size());
    for (size_t i = 0; i < dx.size(); ++i) {
        const double saved = probe.data[i], h = 1e-6;
        probe.data[i] = saved + h;
        double plus = 0, minus = 0;
        const Tensor<double>& up = model.forward(probe);
        for (size_t j = 0; j < c.size(); ++j) plus += up.data[j] * c[j];
        probe.data[i] = saved - h;
        const Tensor<double>& down = model.forward(probe);
        for (size_t j = 0; j < c.size(); ++j) minus += down.data[j] * c[j];
        probe.data[i] = saved;
        numeric[i] = (plus - minus) / (2 * h);
    }
    CHECK_CLOSE(dx.data(), numeric, 1e-8, 1e-5);

    // model files keep the tree
    const std::string path = "cnnbp_test_containers.npz";
    const V expected = model.forward(x).data;
    save(model, path);
    auto loaded = load<double>(path);
    CHECK(loaded.named_parameters().size() == 8);
    CHECK(dynamic_cast<Concat<double>*>(&loaded[0]) != nullptr);
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
    std::remove(path.c_str());

    // train() reaches the whole tree; zero_grad() too
    model.eval();
    CHECK(!block->layer(1)->is_training());
    model.zero_grad();
    for (auto* p : model.parameters()) CHECK(!p->has_grad());
}

TEST_CASE("nn: containers refuse cycles, repeats and shapes that do not combine") {
    auto inner = std::make_shared<Sequential<float>>();
    inner->add(std::make_shared<ReLU<float>>());
    auto residual = std::make_shared<Residual<float>>(inner);
    CHECK_THROWS(inner->add(residual),
                 "[Sequential] layer: expected a layer that does not contain the Sequential");
    CHECK_THROWS(inner->add(inner), "[Sequential] layer: expected a layer that does not contain");
    CHECK_THROWS(inner->add(nullptr), "[Sequential] layer: expected a layer, got null");
    CHECK_THROWS(Residual<float>(nullptr), "[Residual] block: expected a layer, got null");
    CHECK_THROWS(Residual<float>(inner, inner), "[Residual] shortcut: expected a layer other than");
    CHECK_THROWS(Concat<float>({}), "[Concat] branches: expected at least one, got none");
    CHECK_THROWS(Concat<float>({inner, inner}), "[Concat] branch 1: expected a layer other than");
    auto widen = std::make_shared<Linear<float>>(3, 4);
    Residual<float> mismatched(widen);
    const Tensor<float> narrow({2, 3});
    CHECK_THROWS(
        mismatched.forward(narrow),
        "[Residual] block output: expected the shape of the input (2, 3), got shape (2, 4)");
    // an empty batch: empty outputs and gradients (the channel stride is not size / (N * K))
    Concat<float> pair({std::make_shared<Linear<float>>(3, 2), std::make_shared<ReLU<float>>()});
    const Tensor<float> none({0, 3});  // kept alive until the backward, as forward asks
    CHECK(pair.forward(none).shape == Shape({0, 5}));
    const Tensor<float> none_out({0, 5}), flat_input({3});
    CHECK(pair.backward(none_out).shape == Shape({0, 3}));
    Concat<float> flat({std::make_shared<ReLU<float>>()});
    CHECK_THROWS(flat.forward(flat_input),
                 "[Concat] branch 0 output: expected at least 2 dims (N, K, ...), got shape (3,)");
}

TEST_CASE("nn: Softmax and LogSoftmax by class and by name, any dim; model files keep them") {
    const Shape shape{2, 3, 4};
    const Tensor<double> x(shape, values(24, 51)), g(shape, values(24, 52));
    V want(24), dwant(24);
    for (int64_t dim : {1, -1, 0}) {
        const SoftmaxDims d = softmax_dims("softmax", shape, dim);
        Softmax<double> softmax(dim);
        CHECK(softmax.dim() == dim);
        softmax_forward(want.data(), x.data.data(), d);
        CHECK_CLOSE(softmax.forward(x).data.data(), want, 0, 0);
        softmax_backward(dwant.data(), g.data.data(), want.data(), d);
        CHECK_CLOSE(softmax.backward(g).data.data(), dwant, 0, 0);
        LogSoftmax<double> log_softmax(dim);
        log_softmax_forward(want.data(), x.data.data(), d);
        CHECK_CLOSE(log_softmax.forward(x).data.data(), want, 0, 0);
        log_softmax_backward(dwant.data(), g.data.data(), want.data(), d);
        CHECK_CLOSE(log_softmax.backward(g).data.data(), dwant, 0, 0);
    }
    CHECK(json::dump(Softmax<float>().config()) == "{\"type\": \"Softmax\", \"dim\": 1}");
    CHECK(json::dump(LogSoftmax<float>(-2).config()) == "{\"type\": \"LogSoftmax\", \"dim\": -2}");
    auto made = make_layer<double>("LogSoftmax", {}, {{"dim", -3}});
    CHECK(dynamic_cast<LogSoftmax<double>&>(*made).dim() == -3);
    CHECK(make_layer<float>("Softmax", {}, {})->type() == "Softmax");
    // any int is a dim; the input's dims decide at forward
    Softmax<double> far(3);
    CHECK_THROWS(far.forward(x),
                 "[softmax] dim: expected an int in [-3, 2] (input shape (2, 3, 4)), got 3");
    CHECK_THROWS(LogSoftmax<double>(-4).forward(x),
                 "[log_softmax] dim: expected an int in [-3, 2] (input shape (2, 3, 4)), got -4");
    CHECK_THROWS(make_layer<float>("Softmax", {1.5}, {}), "[Softmax] dim: expected an int");
    Softmax<double> softmax;
    softmax.forward(x);
    const Tensor<double> short_grad({2, 3});
    CHECK_THROWS(softmax.backward(short_grad),
                 "[softmax_backward] doutput: expected shape (2, 3, 4) (a's), got shape (2, 3)");

    Sequential<double> model;
    model.add(std::make_unique<Softmax<double>>(-1)).add(std::make_unique<LogSoftmax<double>>(0));
    const V expected = model.forward(x).data;
    const std::string path = "cnnbp_test_softmax.npz";
    save(model, path);
    auto loaded = load<double>(path);
    std::remove(path.c_str());
    CHECK(loaded.size() == 2);
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
    CHECK(json::dump(loaded[0].config()) == "{\"type\": \"Softmax\", \"dim\": -1}");
}

TEST_CASE("nn: NLLLoss after LogSoftmax equals CrossEntropyLoss; train_step takes it") {
    manual_seed(4);
    Sequential<double> model;
    model.add(std::make_shared<Conv2d<double>>(Conv2dOptions(2, 3, 3).padding(1)))
        .add(std::make_shared<LogSoftmax<double>>(1));
    const Tensor<double> x({2, 2, 4, 3}, values(48, 53));
    std::vector<int64_t> label_values(24);
    for (size_t i = 0; i < label_values.size(); ++i) label_values[i] = int64_t(i % 3);
    label_values[7] = -100;
    const Tensor<int64_t> labels({2, 4, 3}, label_values);
    const Tensor<double> weight({3}, V{0.5, 2.0, 1.0});
    for (Reduction reduction : {Reduction::Mean, Reduction::Sum}) {
        NLLLoss<double> nll(NLLLossOptions().weight(weight).reduction(reduction));
        CrossEntropyLoss<double> ce(CrossEntropyLossOptions().weight(weight).reduction(reduction));
        CHECK(nll.type() == "NLLLoss" && nll.reduction() == reduction);
        const double value = nll.forward(model.forward(x), labels);
        const Tensor<double> logits = model[0].output();
        CHECK_CLOSE(value, ce.forward(logits, labels), 0, 1e-14);
        model.zero_grad();
        model.backward(nll.backward());
        const Tensor<double> dlogits = model[1].grad_input();
        CHECK_CLOSE(dlogits.data.data(), ce.backward().data, 1e-15, 1e-12);
        auto objective = [&] { return nll.forward(model.forward(x), labels); };
        check_against_differences(model, objective);
    }
    // reduction 'none': per position, 0 where ignored
    NLLLoss<double> none(NLLLossOptions().reduction(Reduction::None));
    CHECK(none.forward(model.forward(x), labels) == 0.0);
    CHECK(none.losses().shape == (Shape{2, 4, 3}) && none.losses().data[7] == 0.0);
    CHECK_THROWS(none.forward(model.forward(x), Tensor<double>({2, 3, 4, 3})),
                 "[nll_loss] target: expected class indices (int64), got floats");
    CHECK_THROWS(NLLLoss<double>().forward(model.forward(x), Tensor<int64_t>({2, 4})),
                 "[nll_loss] labels: expected shape (2, 4, 3) (input's without the class dim)");
    CHECK_THROWS(NLLLoss<double>(NLLLossOptions().weight(Tensor<double>({3, 1}))),
                 "[NLLLoss] weight: expected 1 dim (one weight per class), got shape (3, 1)");

    // train_step with NLLLoss learns
    NLLLoss<double> nll;
    SGD<double> sgd(model.parameters(), 0.5);
    const double first = train_step(model, x, labels, nll, sgd);
    double last = first;
    for (int i = 0; i < 20; ++i) last = train_step(model, x, labels, nll, sgd);
    CHECK(last < first);
}

TEST_CASE("nn: BatchNorm2d by options; buffers, modes and model files keep the statistics") {
    BatchNorm2d<double> plain(3);
    CHECK(json::dump(plain.config()) ==
          "{\"type\": \"BatchNorm2d\", \"num_features\": 3, \"eps\": 1e-05, \"momentum\": 0.1, "
          "\"affine\": true, \"track_running_stats\": true}");
    CHECK(plain.weight.value.data == V({1, 1, 1}) && plain.bias.value.data == V({0, 0, 0}));
    CHECK(plain.running_var.data == V({1, 1, 1}) && plain.num_batches_tracked.shape.empty());
    BatchNorm2d<double> cumulative(BatchNorm2dOptions(3).momentum(std::nullopt).eps(1e-3));
    CHECK(!cumulative.momentum() && cumulative.eps() == 1e-3);
    BatchNorm2d<float> bare(BatchNorm2dOptions(2).affine(false).track_running_stats(false));
    CHECK(bare.named_parameters().empty() && bare.named_buffers().empty());
    CHECK_THROWS(BatchNorm2d<float>(BatchNorm2dOptions(2).momentum(1.5)),
                 "[BatchNorm2d] momentum: expected a number in [0, 1] or None, got 1.5");
    CHECK_THROWS(BatchNorm2d<float>(BatchNorm2dOptions(2).eps(0)),
                 "[BatchNorm2d] eps: expected a finite number > 0, got 0");
    const Tensor<float> one_value({1, 2, 1, 1});
    const Tensor<double> four_channels({2, 4, 3, 3});
    CHECK_THROWS(bare.forward(one_value),
                 "[batch_norm2d] input: expected more than 1 value per channel when training");
    CHECK_THROWS(plain.forward(four_channels),
                 "[batch_norm2d] input: expected 3 channels (num_features), got shape");

    // training: the kernel's batch statistics and the running statistics with factor
    // 1 / num_batches_tracked (momentum None); evaluation: the running statistics
    const Tensor<double> x({2, 3, 2, 4}, values(48, 61)), g({2, 3, 2, 4}, values(48, 62));
    V rm{0, 0, 0}, rv{1, 1, 1}, mean(3), invstd(3), y(48), dx(48), dw(3), db(3);
    const double* none = nullptr;  // no weight, no bias
    const auto d = batch_norm2d_dims("batch_norm2d", x.shape, nullptr, nullptr, nullptr, nullptr,
                                     batch_norm2d_params("batch_norm2d", true, 1.0, 1e-3));
    for (int step = 1; step <= 2; ++step) {
        const BatchNorm2dParams p = batch_norm2d_params("batch_norm2d", true, 1.0 / step, 1e-3);
        batch_norm2d_forward(y.data(), mean.data(), invstd.data(), x.data.data(), none, none,
                             rm.data(), rv.data(), d, p);
        CHECK_CLOSE(cumulative.forward(x).data.data(), y, 0, 0);
    }
    CHECK(cumulative.num_batches_tracked.data[0] == 2);
    CHECK_CLOSE(cumulative.running_mean.data.data(), rm, 0, 0);
    CHECK_CLOSE(cumulative.running_var.data.data(), rv, 0, 0);
    batch_norm2d_backward(dx.data(), dw.data(), db.data(), g.data.data(), x.data.data(), none,
                          mean.data(), invstd.data(), d, true);
    CHECK_CLOSE(cumulative.backward(g).data.data(), dx, 0, 0);
    CHECK_CLOSE(cumulative.weight.grad.data.data(), dw, 0, 0);

    // a network with batch norm: train_step updates the running statistics; a model file keeps
    // them (num_batches_tracked as int64) and the evaluation-mode outputs
    manual_seed(17);
    Sequential<double> model;
    model.add(std::make_unique<Conv2d<double>>(Conv2dOptions(3, 4, 3).padding(1)))
        .add(std::make_unique<BatchNorm2d<double>>(4))
        .add(std::make_unique<ReLU<double>>())
        .add(std::make_unique<BatchNorm2d<double>>(BatchNorm2dOptions(4).affine(false)))
        .add(std::make_unique<Flatten<double>>())
        .add(std::make_unique<Linear<double>>(32, 1));
    const auto names = model.named_buffers();
    CHECK(names.size() == 6 && names[0].first == "1.running_mean" &&
          names[5].first == "3.num_batches_tracked");
    BCEWithLogitsLoss<double> loss;
    SGD<double> sgd(model.parameters(), 0.1);
    const Tensor<double> target({2, 1}, V{1, 0});
    for (int i = 0; i < 3; ++i) train_step(model, x, target, loss, sgd);
    auto& bn = dynamic_cast<BatchNorm2d<double>&>(model[1]);
    CHECK(bn.num_batches_tracked.data[0] == 3 && bn.running_mean.data[0] != 0);
    model.eval();
    const V expected = model.forward(x).data;
    const std::string path = "cnnbp_test_batch_norm.npz";
    save(model, path);
    auto loaded = load<double>(path);
    std::remove(path.c_str());
    loaded.eval();
    CHECK_CLOSE(loaded.forward(x).data.data(), expected, 0, 0);
    auto& bn2 = dynamic_cast<BatchNorm2d<double>&>(loaded[1]);
    CHECK(bn2.num_batches_tracked.data[0] == 3 && bn2.running_var.data == bn.running_var.data);
    CHECK(json::dump(loaded[3].config()) == json::dump(model[3].config()));
}

TEST_CASE("nn: batch_norm2d results do not depend on the thread count") {
    const Shape shape{8, 16, 24, 24}, channels{16};
    const size_t n = size_t(numel(shape));
    const V x = values(n, 63, 2.0), g = values(n, 64), w = values(16, 65), b = values(16, 66);
    for (bool training : {true, false}) {
        const auto p = batch_norm2d_params("batch_norm2d", training, 0.1, 1e-5);
        const auto d =
            batch_norm2d_dims("batch_norm2d", shape, &channels, &channels, &channels, &channels, p);
        CHECK_THREAD_COUNT_INDEPENDENT([&]() {
            V y(n), mean(16), invstd(16), rm(16, 0.5), rv(16, 2.0), dx(n), dw(16), db(16);
            batch_norm2d_forward(y.data(), mean.data(), invstd.data(), x.data(), w.data(), b.data(),
                                 rm.data(), rv.data(), d, p);
            if (!training) mean = rm, invstd.assign(16, 1 / std::sqrt(2.0 + 1e-5));
            batch_norm2d_backward(dx.data(), dw.data(), db.data(), g.data(), x.data(), w.data(),
                                  mean.data(), invstd.data(), d, training);
            using cnnbp_test::bytes_of;
            return std::vector<std::string>{bytes_of(y),  bytes_of(rm), bytes_of(rv),
                                            bytes_of(dx), bytes_of(dw), bytes_of(db)};
        });
    }
}

TEST_CASE("nn: NoGradGuard gives the same outputs on recycled buffers and keeps no trace") {
    manual_seed(31);
    using L = std::shared_ptr<Layer<double>>;
    const auto conv = [](int64_t c, int64_t k, int64_t r) {
        return std::make_shared<Conv2d<double>>(Conv2dOptions(c, k, r).padding(r / 2));
    };
    const auto seq = [](std::vector<L> layers) {
        return std::make_shared<Sequential<double>>(std::move(layers));
    };
    // (8, 16, 32, 32) doubles are 1 MiB, so these outputs are recycled; the head's are not
    auto stem_relu = std::make_shared<ReLU<double>>();
    auto block = seq({conv(16, 16, 3), std::make_shared<BatchNorm2d<double>>(16),
                      std::make_shared<ReLU<double>>(), conv(16, 16, 3)});
    auto residual = std::make_shared<Residual<double>>(
        block, seq({conv(16, 16, 1), std::make_shared<BatchNorm2d<double>>(16)}));
    auto concat = std::make_shared<Concat<double>>(
        std::vector<L>{seq({conv(16, 16, 3), std::make_shared<ReLU<double>>()}), conv(16, 8, 1)});
    auto head = std::make_shared<Linear<double>>(24, 3);
    Sequential<double> model({conv(2, 16, 3), std::make_shared<BatchNorm2d<double>>(16), stem_relu,
                              residual, std::make_shared<ReLU<double>>(), concat,
                              std::make_shared<AdaptiveAvgPool2d<double>>(1),
                              std::make_shared<Flatten<double>>(), head});
    model.eval();
    const Tensor<double> x({8, 2, 32, 32}, values(8 * 2 * 32 * 32, 32)), dy({8, 3}, 1.0);
    const V expected = model.forward(x).data;
    const V stem_output = stem_relu->output().data;
    CHECK(grad_enabled());
    {
        NoGradGuard no_grad;
        CHECK(!grad_enabled());
        for (int pass = 0; pass < 3; ++pass) {  // the later passes run on recycled storage
            CHECK(model.forward(x).data == expected);
            CHECK(model.output().data == expected);
        }
        CHECK(model.input() == nullptr);
        CHECK(model[0].input() == nullptr);
        CHECK(stem_relu->output().shape.empty());  // passed on and recycled
        CHECK(head->output().shape == Shape({8, 3}));
        CHECK_THROWS_AS(model.backward(dy), std::logic_error,
                        "[Linear] backward called before forward");
        SGD<double> sgd(model.parameters(), 0.1);
        BCEWithLogitsLoss<double> loss;
        CHECK_THROWS_AS(train_step(model, x, Tensor<double>({8, 3}, 0.5), loss, sgd),
                        std::logic_error, "[train_step] expected gradients enabled");
    }
    CHECK(grad_enabled());
    // with gradients again: the whole trace, the same values
    CHECK(model.forward(x).data == expected);
    CHECK(stem_relu->output().data == stem_output);
    CHECK(model[1].input() == &model[0].output());
    model.backward(dy);
    CHECK(model.grad_input().shape == x.shape);
}
