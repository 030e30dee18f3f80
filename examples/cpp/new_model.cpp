// Builds a model from a list of layer entries (the "layers" of a model file's architecture,
// as JSON) through the layer registry, with weights drawn after manual_seed(seed), and saves
// it as a model file. The same entries and seed give the same weights in Python:
//   cnnbp.manual_seed(seed); nn.Sequential(*(getattr(nn, e.pop("type"))(**e) for e in layers))
//
// Usage: new_model layers.json seed float32|float64 out.npz
#include <cnnbp/cnnbp.hpp>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

template <typename T>
void build_and_save(const cnnbp::json::Array& layers, const std::string& path) {
    cnnbp::nn::Sequential<T> model;
    for (const cnnbp::json::Value& entry : layers) {
        cnnbp::json::Object arguments = *entry.get<cnnbp::json::Object>();
        const std::string type = *cnnbp::json::find(arguments, "type")->get<std::string>();
        arguments.erase(arguments.begin());  // "type" comes first
        model.add(cnnbp::nn::make_layer<T>(type, {}, arguments));
    }
    cnnbp::nn::save(model, path);
}

int main(int argc, char** argv) {
    if (argc != 5) {
        std::fprintf(stderr, "usage: new_model layers.json seed float32|float64 out.npz\n");
        return 2;
    }
    try {
        std::ifstream in(argv[1]);
        std::stringstream text;
        text << in.rdbuf();
        const cnnbp::json::Value layers = cnnbp::json::parse(text.str(), "layers");
        if (!layers.get<cnnbp::json::Array>()) throw std::invalid_argument("expected a JSON list");
        cnnbp::nn::manual_seed(std::stoull(argv[2]));
        if (std::string(argv[3]) == "float32")
            build_and_save<float>(*layers.get<cnnbp::json::Array>(), argv[4]);
        else
            build_and_save<double>(*layers.get<cnnbp::json::Array>(), argv[4]);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "new_model: %s\n", e.what());
        return 2;
    }
}
