// cnnbp/data.hpp -- data for training in C++: the arrays of a .npz file (as NumPy's np.savez
// writes them), the predicted classes of a batch of scores and the accuracy of those
// predictions.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "cnnbp/nn.hpp"

namespace cnnbp::nn {

// The arrays of an uncompressed .npz archive, read and checked once (the checks of model
// files: nothing past the file's end, plain numeric arrays in C order), each converted to
// the tensor type asked for. Errors are std::invalid_argument "[load] ...".
class NpzFile {
 public:
    explicit NpzFile(const std::string& path);
    // the arrays' names (without ".npy"), sorted
    std::vector<std::string> names() const;
    bool contains(const std::string& name) const;
    // the array `name` as a tensor of T (float, double or int64_t): floats to floats, and
    // integers or bools to any; a float array refused as int64_t, a missing name refused
    template <typename T>
    Tensor<T> tensor(const std::string& name) const;

 private:
    std::string path_, bytes_;
    std::vector<std::string> names_;
};

// The class of each row of (N, K) scores: the index of its largest value, the first on a
// tie and a NaN as the largest (NumPy's argmax along axis 1).
template <typename T>
Tensor<int64_t> argmax(const Tensor<T>& scores);

// The fraction of rows of (N, K) scores whose argmax is the row's label (N,); 0 for N = 0.
template <typename T>
double accuracy(const Tensor<T>& scores, const Tensor<int64_t>& labels);

}  // namespace cnnbp::nn
