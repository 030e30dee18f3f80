// cnnbp/model_file.hpp -- one file holding a model's architecture and weights (and,
// optionally, an optimizer's settings and state), written and read by this library for C++
// and Python alike (Python's model.save(path) and cnnbp.load(path) call these functions).
//
// The file is an uncompressed .npz (a zip of .npy arrays; NumPy reads it with
// np.load(path, allow_pickle=False)):
//   architecture.npy   uint8, the UTF-8 JSON
//                      {"format": "cnnbp-model", "version": 1, "dtype": "float32",
//                       "layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 1,
//                                   "kernel_size": [3, 3], "stride": [1, 1],
//                                   "padding": [0, 0], "bias": true}, {"type": "ReLU"}, ...]}
//                      each layer entry: its type and the saved arguments its declaration
//                      lists (cnnbp/registry.hpp), nothing else
//   0.weight.npy, ...  each parameter under its torch name, little-endian float32/float64,
//                      C order, the shapes the architecture implies
//   1.running_mean.npy, ...  each buffer under its torch name after the parameters: running
//                      statistics in the model's dtype, num_batches_tracked int64 of shape ()
//   optimizer.npy      (optional) an optimizer's settings, JSON {"type": "SGD", "version": 1,
//                      "lr": 0.1, "hyperparameters": {...exactly the type's settings()...},
//                      "steps": [per parameter: Adam's step count, or null]}
//   optimizer.0.momentum_buffer.npy, optimizer.3.exp_avg.npy, ...  its state per parameter
// Loading is data only: anything else -- compressed or encrypted entries, object or
// pickled arrays, unknown layers or fields, missing or extra arrays, wrong shapes or dtypes,
// sizes that run past the file -- is refused with std::invalid_argument "[load] ...".
// Saving writes a temporary file and renames it over `path`, so a failed save (cnnbp::io_error)
// leaves the old file.
#pragma once

#include <memory>
#include <string>

#include "cnnbp/nn.hpp"

namespace cnnbp::nn {

// With an optimizer (over exactly model.parameters(), in order), its settings and state go
// in the file too.
template <typename T>
void save(Sequential<T>& model, const std::string& path, const Optimizer<T>* optimizer = nullptr);

// T must match the file's dtype ("[load] dtype: expected float32, got float64" otherwise).
// An optimizer in the file is checked only by load_checkpoint.
template <typename T>
Sequential<T> load(const std::string& path);

// The model and the optimizer saved beside it (nullptr when the file holds none), over the
// new model's parameters and with its state: training resumes where it stopped.
template <typename T>
struct Checkpoint {
    Sequential<T> model;
    std::shared_ptr<Optimizer<T>> optimizer;
};
template <typename T>
Checkpoint<T> load_checkpoint(const std::string& path);

// "float32" or "float64": the dtype a model file holds, to pick load<float> or load<double>.
std::string model_file_dtype(const std::string& path);

}  // namespace cnnbp::nn
