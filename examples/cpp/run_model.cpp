// Loads a model file (written by Python's model.save or by cnnbp::nn::save), runs it on an
// input in evaluation mode, prints the output, and optionally writes the model back out from C++.
//
// Usage: run_model model.npz input.txt [copy.npz]
// input.txt: the input's shape on the first line (e.g. "2 1 6 6"), then its values.
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

template <typename T>
int run(const std::string& model_path, const std::string& input_path, const char* copy_path) {
    auto model = cnnbp::nn::load<T>(model_path);
    model.eval();  // inference: Dropout passes its input through
    std::ifstream in(input_path);
    if (!in) throw std::runtime_error("cannot open " + input_path);
    std::string first_line;
    std::getline(in, first_line);
    std::istringstream dims(first_line);
    cnnbp::Shape shape;
    for (int64_t d; dims >> d;) shape.push_back(d);
    cnnbp::nn::Tensor<T> x(shape);
    for (T& v : x.data)
        if (!(in >> v)) throw std::runtime_error(input_path + ": too few values for its shape");
    const auto& y = model.forward(x);
    std::printf("shape");
    for (int64_t d : y.shape) std::printf(" %lld", static_cast<long long>(d));
    std::printf("\nvalues");
    for (T v : y.data) std::printf(" %.17g", double(v));
    std::printf("\n");
    if (copy_path) cnnbp::nn::save(model, copy_path);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: run_model model.npz input.txt [copy.npz]\n");
        return 2;
    }
    try {
        const char* copy = argc > 3 ? argv[3] : nullptr;
        if (cnnbp::nn::model_file_dtype(argv[1]) == "float32")
            return run<float>(argv[1], argv[2], copy);
        return run<double>(argv[1], argv[2], copy);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "run_model: %s\n", e.what());
        return 2;
    }
}
