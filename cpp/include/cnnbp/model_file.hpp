// cnnbp/model_file.hpp -- one file holding a model's architecture and weights, written and
// read by C++ and by Python alike (Python: model.save(path), cnnbp.load(path)).
//
// The file is an uncompressed .npz (a zip of .npy arrays; NumPy reads it with
// np.load(path, allow_pickle=False)):
//   architecture.npy   uint8, the UTF-8 JSON
//                      {"format": "cnnbp-model", "version": 1, "dtype": "float32",
//                       "layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 1,
//                                   "kernel_size": [3, 3], "stride": [1, 1],
//                                   "padding": [0, 0], "bias": true}, {"type": "ReLU"}, ...]}
//                      (Linear: in_features, out_features, bias; MaxPool2d and AvgPool2d:
//                      kernel_size, stride, padding; Dropout: p; ReLU, Sigmoid, Tanh,
//                      Flatten: type only)
//   0.weight.npy, ...  each parameter under its torch name, little-endian float32/float64,
//                      C order, the shapes the architecture implies
//   optimizer.npy, optimizer.0.exp_avg.npy, ...   (optional) an optimizer's settings (JSON)
//                      and state, written by Python's model.save(path, optimizer=opt) and
//                      read by cnnbp.load(path, optimizer=True); load() here skips them
// Loading is data only: anything else -- compressed or encrypted entries, object or
// pickled arrays, unknown layers, missing or extra arrays, wrong shapes or dtypes, sizes
// that run past the file -- is refused with std::invalid_argument "[load] ...". Saving
// writes a temporary file and renames it over `path`, so a failed save leaves the old file.
#pragma once

#include <string>

#include "cnnbp/nn.hpp"

namespace cnnbp::nn {

template <typename T>
void save(Sequential<T>& model, const std::string& path);

// T must match the file's dtype ("[load] dtype: expected float32, got float64" otherwise).
template <typename T>
Sequential<T> load(const std::string& path);

// "float32" or "float64": the dtype a model file holds, to pick load<float> or load<double>.
std::string model_file_dtype(const std::string& path);

}  // namespace cnnbp::nn
