// Trains the network of `cnnbp train --arch cnn` (LeNet-style: conv 3x3 -> ReLU -> max-pool
// 2x2, twice, then one linear layer) with Sequential + train_step, on the data a Python run
// exported, and prints the same per-epoch lines and the same test accuracy as that run:
//
//   cnnbp train --seed 3 --epochs 5 --export-data run.npz    # trains in Python, writes run.npz
//   train_lenet run.npz                                       # the same numbers from C++
//
// run.npz (cnnbp.data.export_npz) holds x_train, y_train, x_test, y_test, the seed and
// `order`: for every epoch, the order in which Python's DataLoader visits the training
// images (NumPy's shuffle is not reproduced in C++, so it is read). The seed gives the same
// initial weights as in Python (manual_seed); the epochs are the rows of `order`. The
// settings default to those of `cnnbp train --arch cnn` (SGD, lr 0.05, momentum 0.9, batch
// 32, a constant rate); pass the same options as to `cnnbp train` to change them.
//
// Usage: train_lenet DATA.npz [--batch-size N] [--lr X] [--momentum M]
//                             [--schedule constant|step|cosine]
// Prints one line per epoch as `cnnbp train --quiet` does, then
//   result: train_loss L test_loss L test_accuracy A correct K count N
// with every number in full (%.17g): the last epoch's mean training loss and the final
// evaluation.
#include <algorithm>
#include <cmath>
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using namespace cnnbp::nn;

namespace {

// What `cnnbp train --arch cnn` runs with unless told otherwise (python/cnnbp/train.py).
struct Settings {
    int64_t batch_size = 32;  // DEFAULT_BATCH_SIZE
    double lr = 0.05;         // the SGD default
    double momentum = 0.9;    // DEFAULT_MOMENTUM
    std::string schedule = "constant";
};
constexpr int64_t kEvalBatchSize = 1000;  // EVAL_BATCH_SIZE

// train.py's build_model: conv-ReLU-pool twice, then linear, for images (C, H, W). The
// layers are made in Python's order, so they draw the same weights from the seeded generator.
Sequential<float> build_model(int64_t channels, int64_t height, int64_t width, int64_t classes) {
    return Sequential<float>({
        std::make_shared<Conv2d<float>>(Conv2dOptions(channels, 32, 3).padding(1)),
        std::make_shared<ReLU<float>>(),
        std::make_shared<MaxPool2d<float>>(2),
        std::make_shared<Conv2d<float>>(Conv2dOptions(32, 64, 3).padding(1)),
        std::make_shared<ReLU<float>>(),
        std::make_shared<MaxPool2d<float>>(2),
        std::make_shared<Flatten<float>>(),
        std::make_shared<Linear<float>>(64 * (height / 4) * (width / 4), classes),
    });
}

// The rows `index[0..count)` of x (samples along the first dimension), as one batch.
template <typename T>
Tensor<T> take(const Tensor<T>& x, const int64_t* index, int64_t count) {
    cnnbp::Shape shape = x.shape;
    shape[0] = count;
    Tensor<T> batch(shape);
    const size_t row = x.data.size() / size_t(x.shape[0]);
    for (int64_t i = 0; i < count; ++i)
        std::copy_n(x.data.begin() + ptrdiff_t(size_t(index[i]) * row), row,
                    batch.data.begin() + ptrdiff_t(size_t(i) * row));
    return batch;
}

struct Evaluation {
    double loss = 0.0;  // mean over the images
    int64_t correct = 0, count = 0;
    double accuracy() const { return double(correct) / double(count); }
};

// train.py's evaluate: eval mode without gradients, batches of kEvalBatchSize in order, the
// loss weighted by each batch's size.
Evaluation evaluate(Sequential<float>& model, const Tensor<float>& x, const Tensor<int64_t>& y) {
    model.eval();
    NoGradGuard no_grad;  // nothing kept for a backward (torch::NoGradGuard)
    CrossEntropyLoss<float> loss_fn;
    Evaluation result;
    result.count = y.size();
    std::vector<int64_t> index(size_t(result.count));
    for (int64_t i = 0; i < result.count; ++i) index[size_t(i)] = i;
    for (int64_t first = 0; first < result.count; first += kEvalBatchSize) {
        const int64_t n = std::min(kEvalBatchSize, result.count - first);
        const Tensor<float> xb = take(x, index.data() + first, n);
        const Tensor<int64_t> yb = take(y, index.data() + first, n);
        const Tensor<float>& output = model.forward(xb);
        result.loss += loss_fn.forward(output, yb) * double(n);
        const Tensor<int64_t> predicted = argmax(output);
        for (int64_t i = 0; i < n; ++i)
            result.correct += predicted.data[size_t(i)] == yb.data[size_t(i)];
    }
    result.loss /= double(result.count);
    return result;
}

// `value` as a number, all of it; else an error naming the option
double number(const std::string& option, const std::string& value) {
    size_t used = 0;
    double v = 0.0;
    try {
        v = std::stod(value, &used);
    } catch (const std::exception&) {
    }
    if (used == 0 || used != value.size())
        throw std::invalid_argument(option + ": expected a number, got '" + value + "'");
    return v;
}

Settings parse_options(int argc, char** argv) {
    Settings settings;
    for (int i = 2; i + 1 < argc; i += 2) {
        const std::string option = argv[i], value = argv[i + 1];
        if (option == "--batch-size") {
            const double size = number(option, value);
            if (size < 1 || size != std::floor(size) || size > 1e15)
                throw std::invalid_argument(option + ": expected an integer >= 1, got " + value);
            settings.batch_size = int64_t(size);
        } else if (option == "--lr") {
            settings.lr = number(option, value);
        } else if (option == "--momentum") {
            settings.momentum = number(option, value);
        } else if (option == "--schedule") {
            settings.schedule = value;
        } else {
            throw std::invalid_argument("unknown option " + option);
        }
    }
    if (settings.schedule != "constant" && settings.schedule != "step" &&
        settings.schedule != "cosine")
        throw std::invalid_argument("--schedule: expected constant, step or cosine, got " +
                                    settings.schedule);
    return settings;
}

int train(const std::string& path, const Settings& settings) {
    const NpzFile file(path);
    const Tensor<float> x_train = file.tensor<float>("x_train"),
                        x_test = file.tensor<float>("x_test");
    const Tensor<int64_t> y_train = file.tensor<int64_t>("y_train"),
                          y_test = file.tensor<int64_t>("y_test");
    const Tensor<int64_t> order = file.tensor<int64_t>("order");  // (epochs, n_train)
    const bool shaped = x_train.shape.size() == 4 && x_test.shape.size() == 4 &&
                        order.shape.size() == 2 && x_train.shape[0] == y_train.size() &&
                        x_test.shape[0] == y_test.size() && order.shape[1] == y_train.size();
    if (!shaped)
        throw std::invalid_argument(path + ": expected the arrays of cnnbp.data.export_npz");
    const int64_t epochs = order.shape[0], n_train = order.shape[1];
    for (int64_t i : order.data)
        if (i < 0 || i >= n_train)
            throw std::invalid_argument(path + ": order: index out of range");
    int64_t classes = 0;  // as Python counts them: the largest label of either part, plus one
    for (const Tensor<int64_t>* labels : {&y_train, &y_test})
        for (int64_t label : labels->data) classes = std::max(classes, label + 1);

    manual_seed(uint64_t(file.tensor<int64_t>("seed").data[0]));  // the initial weights
    Sequential<float> model =
        build_model(x_train.shape[1], x_train.shape[2], x_train.shape[3], classes);
    SGD<float> optimizer(model.parameters(), settings.lr, settings.momentum);
    std::unique_ptr<LRScheduler<float>> schedule;  // stepped once per epoch (train.py's SCHEDULES)
    if (settings.schedule == "step")
        schedule =
            std::make_unique<StepLR<float>>(optimizer, std::max<int64_t>(1, epochs / 3), 0.1);
    else if (settings.schedule == "cosine")
        schedule = std::make_unique<CosineAnnealingLR<float>>(optimizer, epochs);
    CrossEntropyLoss<float> loss_fn;

    std::printf("data: %s, %lld training and %lld test images, %lld classes\n", path.c_str(),
                (long long)n_train, (long long)y_test.size(), (long long)classes);
    const int width = int(std::to_string(epochs).size());
    double train_loss = 0.0;
    for (int64_t epoch = 0; epoch < epochs; ++epoch) {
        model.train();
        const int64_t* epoch_order = order.data.data() + epoch * n_train;
        double total = 0.0;
        // the batches of Python's DataLoader: consecutive slices of this epoch's order, the
        // last one shorter when batch_size does not divide n_train
        for (int64_t first = 0; first < n_train; first += settings.batch_size) {
            const int64_t n = std::min(settings.batch_size, n_train - first);
            const Tensor<float> xb = take(x_train, epoch_order + first, n);
            const Tensor<int64_t> yb = take(y_train, epoch_order + first, n);
            total += train_step(model, xb, yb, loss_fn, optimizer) * double(n);
        }
        if (schedule) schedule->step();
        train_loss = total / double(n_train);
        const Evaluation test = evaluate(model, x_test, y_test);
        std::printf("epoch %*lld/%lld  loss %.6f  test loss %.6f  test accuracy %.2f%%\n", width,
                    (long long)epoch + 1, (long long)epochs, train_loss, test.loss,
                    100 * test.accuracy());
    }
    const Evaluation test = evaluate(model, x_test, y_test);
    std::printf("test accuracy %.2f%% (%lld/%lld), test loss %.6f\n", 100 * test.accuracy(),
                (long long)test.correct, (long long)test.count, test.loss);
    std::printf(
        "result: train_loss %.17g test_loss %.17g test_accuracy %.17g correct %lld count %lld\n",
        train_loss, test.loss, test.accuracy(), (long long)test.correct, (long long)test.count);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2 || argc % 2 != 0) {
        std::fprintf(stderr,
                     "usage: train_lenet DATA.npz [--batch-size N] [--lr X] [--momentum M] "
                     "[--schedule constant|step|cosine]\n"
                     "DATA.npz: written by cnnbp train --export-data DATA.npz\n");
        return 2;
    }
    try {
        return train(argv[1], parse_options(argc, argv));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train_lenet: %s\n", e.what());
        return 2;
    }
}
