// Data-parallel gradients with MPI and cnnbp's flat buffers (cnnbp/nn.hpp's pack_*):
// every rank builds the same small CNN (rank 0's parameters broadcast to all), takes its
// share of one batch, and after the backward the ranks average their gradients with one
// MPI_Allreduce of one flat buffer. Each rank then checks the averaged gradient against the
// gradient of the whole batch computed alone (exit status 1 if they differ by more than
// 1e-12 relative).
//
//   mpiexec -n 2 build/examples/cnnbp_mpi_allreduce        (built with -DCNNBP_MPI=ON)
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <memory>
#include <vector>

using namespace cnnbp::nn;

namespace {

constexpr int64_t kBatch = 12;  // the global batch, split evenly over the ranks

Sequential<double> build_model() {
    return Sequential<double>({
        std::make_shared<Conv2d<double>>(Conv2dOptions(1, 4, 3).padding(1)),
        std::make_shared<ReLU<double>>(),
        std::make_shared<MaxPool2d<double>>(MaxPool2dOptions(2)),
        std::make_shared<Flatten<double>>(),
        std::make_shared<Linear<double>>(4 * 4 * 4, 3),
    });
}

// images [first, first + count) of a fixed batch of 8x8 images and their labels
void batch(Tensor<double>& x, Tensor<int64_t>& y, int64_t first, int64_t count) {
    x.resize({count, 1, 8, 8});
    y.resize({count});
    for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < 64; ++j)
            x.data[i * 64 + j] = std::sin(0.37 * (first + i) + 0.11 * j);
        y.data[i] = (first + i) % 3;
    }
}

// the mean-loss gradient of images [first, first + count), packed
std::vector<double> gradients(Sequential<double>& model, int64_t first, int64_t count) {
    Tensor<double> x;
    Tensor<int64_t> y;
    batch(x, y, first, count);
    CrossEntropyLoss<double> loss;
    model.zero_grad();
    loss.forward(model.forward(x), y);
    model.backward(loss.backward());
    std::vector<double> flat(flat_size(model));
    pack_gradients(flat.data(), int64_t(flat.size()), model);
    return flat;
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (kBatch % size != 0) {
        if (rank == 0)
            std::fprintf(stderr, "run with a number of ranks that divides %lld\n",
                         static_cast<long long>(kBatch));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }

    manual_seed(uint64_t(rank));  // different weights on each rank ...
    Sequential<double> model = build_model();
    std::vector<double> parameters(flat_size(model));
    pack_parameters(parameters.data(), int64_t(parameters.size()), model);
    // ... until rank 0's are broadcast: one call for all of them
    MPI_Bcast(parameters.data(), int(parameters.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
    unpack_parameters(model, parameters.data(), int64_t(parameters.size()));

    const int64_t share = kBatch / size;
    std::vector<double> flat = gradients(model, rank * share, share);
    MPI_Allreduce(MPI_IN_PLACE, flat.data(), int(flat.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (double& g : flat) g /= size;
    unpack_gradients(model, flat.data(), int64_t(flat.size()));  // an optimizer steps on these

    const std::vector<double> whole = gradients(model, 0, kBatch);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < whole.size(); ++i) {
        worst = std::max(worst, std::abs(flat[i] - whole[i]));
        scale = std::max(scale, std::abs(whole[i]));
    }
    const bool same = worst <= 1e-12 * scale;
    std::printf(
        "rank %d of %d: %lld gradients in one Allreduce, largest difference from the "
        "whole batch's %.3g (relative %.3g): %s\n",
        rank, size, static_cast<long long>(flat.size()), worst, worst / scale,
        same ? "ok" : "FAILED");
    MPI_Finalize();
    return same ? 0 : 1;
}
