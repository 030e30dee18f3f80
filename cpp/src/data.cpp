// .npz arrays as tensors (over npz.cpp's reader), argmax and accuracy.
#include "cnnbp/data.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "npz.hpp"

namespace cnnbp::nn {

namespace {

// values[i] = T(the i-th item of `a`), for the numeric dtypes npz.cpp accepts
template <typename T>
void convert(T* values, const npz::Array& a, int64_t count, const std::string& name) {
    const char kind = a.descr[1];
    const size_t size = std::stoul(a.descr.substr(2));
    if (a.descr[0] == '>' && size > 1)
        throw std::invalid_argument("[load] " + name + ": expected a little-endian array, got " +
                                    a.dtype);
    const bool want_int = std::is_integral_v<T>;
    if (kind == 'f' && (want_int || size == 2))
        throw std::invalid_argument(std::string("[load] ") + name + ": expected " +
                                    (want_int ? "integers" : "float32 or float64") + ", got " +
                                    a.dtype);
    auto read = [&](auto item) {
        for (int64_t i = 0; i < count; ++i) {
            std::memcpy(&item, a.data + size_t(i) * sizeof(item), sizeof(item));
            values[i] = T(item);
        }
    };
    if (kind == 'f') return size == 4 ? read(float()) : read(double());
    if (kind == 'b' || kind == 'u') {
        if (size == 1) return read(uint8_t());
        if (size == 2) return read(uint16_t());
        if (size == 4) return read(uint32_t());
        return read(uint64_t());
    }
    if (size == 1) return read(int8_t());
    if (size == 2) return read(int16_t());
    if (size == 4) return read(int32_t());
    return read(int64_t());
}

}  // namespace

NpzFile::NpzFile(const std::string& path) : path_(path), bytes_(npz::read_file(path)) {
    for (const auto& [name, array] : npz::read(bytes_)) names_.push_back(name);
}

std::vector<std::string> NpzFile::names() const { return names_; }

bool NpzFile::contains(const std::string& name) const {
    for (const auto& n : names_)
        if (n == name) return true;
    return false;
}

template <typename T>
Tensor<T> NpzFile::tensor(const std::string& name) const {
    const auto arrays = npz::read(bytes_);  // pointers into bytes_, checked again
    const auto found = arrays.find(name);
    if (found == arrays.end()) {
        std::string names;
        for (const auto& n : names_) names += (names.empty() ? "'" : ", '") + n + "'";
        throw std::invalid_argument("[load] " + name + ": expected one of the arrays of " + path_ +
                                    " (" + names + "), got no such array");
    }
    Tensor<T> out(found->second.shape);
    convert(out.data.data(), found->second, out.size(), name);
    return out;
}

template <typename T>
Tensor<int64_t> argmax(const Tensor<T>& scores) {
    if (scores.shape.size() != 2)
        throw std::invalid_argument("[argmax] scores: expected 2 dims (N, K), got shape " +
                                    shape_str(scores.shape));
    const int64_t N = scores.shape[0], K = scores.shape[1];
    if (N > 0 && K == 0)
        throw std::invalid_argument("[argmax] scores: expected at least 1 class, got shape " +
                                    shape_str(scores.shape));
    Tensor<int64_t> out({N});
    for (int64_t n = 0; n < N; ++n) {
        const T* row = scores.data.data() + n * K;
        int64_t best = 0;
        for (int64_t k = 0; k < K && !std::isnan(row[best]); ++k)
            if (std::isnan(row[k]) || row[k] > row[best]) best = k;
        out.data[size_t(n)] = best;
    }
    return out;
}

template <typename T>
double accuracy(const Tensor<T>& scores, const Tensor<int64_t>& labels) {
    const Tensor<int64_t> predicted = argmax(scores);
    if (labels.shape != Shape{predicted.size()})
        throw std::invalid_argument(
            "[accuracy] labels: expected shape " + shape_str(Shape{predicted.size()}) +
            " (one per row of scores), got shape " + shape_str(labels.shape));
    if (predicted.size() == 0) return 0.0;
    int64_t correct = 0;
    for (int64_t i = 0; i < predicted.size(); ++i)
        correct += predicted.data[size_t(i)] == labels.data[size_t(i)];
    return double(correct) / double(predicted.size());
}

template Tensor<float> NpzFile::tensor<float>(const std::string&) const;
template Tensor<double> NpzFile::tensor<double>(const std::string&) const;
template Tensor<int64_t> NpzFile::tensor<int64_t>(const std::string&) const;
template Tensor<int64_t> argmax<float>(const Tensor<float>&);
template Tensor<int64_t> argmax<double>(const Tensor<double>&);
template double accuracy<float>(const Tensor<float>&, const Tensor<int64_t>&);
template double accuracy<double>(const Tensor<double>&, const Tensor<int64_t>&);

}  // namespace cnnbp::nn
