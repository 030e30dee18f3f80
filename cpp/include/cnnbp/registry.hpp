// cnnbp/registry.hpp -- every layer type declared once: its name, its arguments (which are
// also the fields of its model-file entry: kinds, defaults, limits) and how to build it.
// Model files, the Python bindings and the Python classes are all driven by these
// declarations, so a new layer is its kernels, its class in nn.cpp with its declaration
// (CNNBP_REGISTER_LAYER), its oracle function and a test-table entry.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cnnbp/json.hpp"

namespace cnnbp::nn {

template <typename T>
class Layer;

enum class FieldKind {
    Int,          // an integer >= minimum
    Pair,         // an integer or a pair [h, w] of integers >= minimum, kept as [h, w]
    Bool,         // true or false
    Probability,  // a number in [0, 1]
    Seed,         // an integer in [0, 2^63), or null: drawn from manual_seed's generator
    OptionalInt,  // a nonzero integer, or null (AvgPool2d's divisor_override)
    Padding,      // a Pair, or the text "same" or "valid" (Conv2d's padding, as torch's)
    Number,       // a finite number, int or float, kept as a double (LeakyReLU's negative_slope)
    Choice,       // one of the texts in Field::choices (GELU's approximate: 'none' or 'tanh')
    // an integer or a pair [h, w] whose elements are integers >= minimum or null, kept as
    // [h, w]; not null itself (AdaptiveAvgPool2d's output_size: null keeps the input's size)
    OptionalPair,
    // a number in [0, 1], or null (BatchNorm2d's momentum: null is the cumulative average)
    OptionalProbability,
};

// Whether null is a value of the kind (Seed, OptionalInt): a null default is then a default,
// not a required argument.
inline bool takes_null(FieldKind kind) {
    return kind == FieldKind::Seed || kind == FieldKind::OptionalInt ||
           kind == FieldKind::OptionalProbability;
}

// One argument of a layer's constructor (Python's and C++'s), in order.
struct Field {
    Field(std::string name, FieldKind kind, json::Value default_value = nullptr,
          int64_t minimum = 0, std::string default_from = "", bool saved = true)
        : name(std::move(name)),
          kind(kind),
          default_value(std::move(default_value)),
          minimum(minimum),
          default_from(std::move(default_from)),
          saved(saved) {}
    // A Choice field: one of `choices`, `default_value` when not given.
    static Field choice(std::string name, std::vector<std::string> choices,
                        std::string default_value) {
        Field f(std::move(name), FieldKind::Choice, std::move(default_value));
        f.choices = std::move(choices);
        return f;
    }
    std::string name;
    FieldKind kind;
    json::Value default_value;         // null with no default_from: a required argument
    int64_t minimum;                   // Int, Pair and OptionalPair
    std::string default_from;          // a missing or null value takes this field's (pool stride)
    bool saved;                        // false: not part of the architecture (Dropout's seed)
    std::vector<std::string> choices;  // Choice: the texts it takes
};

// A layer's arguments after checking: every field, in the declaration's order, normalized
// (pairs as [h, w], probabilities as doubles).
class Config {
 public:
    Config(std::string type, json::Object values)
        : type_(std::move(type)), values_(std::move(values)) {}
    const std::string& type() const { return type_; }
    const json::Object& values() const { return values_; }
    int64_t integer(const std::string& name) const;
    std::array<int64_t, 2> pair(const std::string& name) const;
    bool boolean(const std::string& name) const;
    double number(const std::string& name) const;
    const std::string& text(const std::string& name) const;  // a Choice field
    std::optional<uint64_t> seed(const std::string& name) const;
    std::optional<int64_t> optional_integer(const std::string& name) const;
    std::optional<double> optional_number(const std::string& name) const;  // OptionalProbability
    // an OptionalPair field: [h, w], each nullopt for null
    std::array<std::optional<int64_t>, 2> optional_pair(const std::string& name) const;
    // a Padding field: "same", "valid" or "" for a pair (then read by pair())
    std::string padding_mode(const std::string& name) const;
    bool has(const std::string& name) const;
    void set(const std::string& name, json::Value value);

 private:
    const json::Value& at(const std::string& name) const;
    std::string type_;
    json::Object values_;
};

struct LayerType {
    LayerType(std::string name, std::string op, std::string doc, std::vector<Field> fields = {},
              std::vector<std::string> trace_extras = {},
              int64_t (*parameter_count)(const Config&) = nullptr)
        : name(std::move(name)),
          op(std::move(op)),
          doc(std::move(doc)),
          fields(std::move(fields)),
          trace_extras(std::move(trace_extras)),
          parameter_count(parameter_count) {}
    std::string name;  // "Conv2d": the C++ class, the Python class and the model file's type
    std::string op;    // the kernel its errors name, as the functional API's: "conv2d"
    std::string doc;   // one line: what the layer computes, with shapes
    std::vector<Field> fields;
    // what the trace shows beyond input, output and gradients ("indices", "mask")
    std::vector<std::string> trace_extras;
    // how many parameter and buffer values a layer of this config holds, checked before
    // building it (nullptr: none; a layer that has one has a dtype, in Python too)
    int64_t (*parameter_count)(const Config&) = nullptr;
    std::shared_ptr<Layer<float>> (*build_f32)(const Config&) = nullptr;
    std::shared_ptr<Layer<double>> (*build_f64)(const Config&) = nullptr;

    // The arguments checked against the fields: positional (in order), then named. Throws
    // argument_type_error ("[Conv2d] kernel_size: expected an int or a pair of ints, got
    // ...") or std::invalid_argument ("[Conv2d] in_channels: expected >= 1, got 0").
    Config parse(const json::Array& positional, const json::Object& named) const;

    template <typename T>
    std::shared_ptr<Layer<T>> build(const Config& config) const;
};

// The declared layer types, in the order of their declaration.
const std::vector<const LayerType*>& layer_types();
// The type of that name, or nullptr.
const LayerType* find_layer_type(const std::string& name);

// A new layer of the named type: make_layer<float>("Conv2d", {}, {{"in_channels", 1}, ...}).
template <typename T>
std::shared_ptr<Layer<T>> make_layer(const std::string& type, const json::Array& positional,
                                     const json::Object& named);

// Adds a declaration to the registry (CNNBP_REGISTER_LAYER does it for a class template).
const LayerType& register_layer(LayerType type);

// In nn.cpp, after a layer class's members: `CNNBP_REGISTER_LAYER(Conv2d, declaration)`
// where `declaration` is a LayerType without its build functions; the class needs a
// constructor from a Config.
#define CNNBP_REGISTER_LAYER(Class, ...)                      \
    static const ::cnnbp::nn::LayerType& registered_##Class = \
        ::cnnbp::nn::register_layer(::cnnbp::nn::with_builders<Class>(__VA_ARGS__))

template <template <typename> class L>
LayerType with_builders(LayerType type) {
    type.build_f32 = [](const Config& c) -> std::shared_ptr<Layer<float>> {
        return std::make_shared<L<float>>(c);
    };
    type.build_f64 = [](const Config& c) -> std::shared_ptr<Layer<double>> {
        return std::make_shared<L<double>>(c);
    };
    return type;
}

}  // namespace cnnbp::nn
