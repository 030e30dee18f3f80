// The layer registry and the checking of layer arguments (see cnnbp/registry.hpp).
#include "cnnbp/registry.hpp"

#include <cmath>
#include <deque>
#include <stdexcept>

#include "cnnbp/errors.hpp"
#include "cnnbp/nn.hpp"

namespace cnnbp::nn {

namespace {

std::vector<const LayerType*>& registry() {
    static std::vector<const LayerType*> types;
    return types;
}

// the declarations themselves, at addresses that stay put as more are added
std::deque<LayerType>& declarations() {
    static std::deque<LayerType> storage;
    return storage;
}

[[noreturn]] void wrong_kind(const std::string& op, const Field& f, const char* expected,
                             const json::Value& got) {
    throw argument_type_error("[" + op + "] " + f.name + ": expected " + expected + ", got " +
                              json::describe(got));
}

// An integer field's value: int64 (not bool); a larger integer is a ValueError.
int64_t integer_of(const std::string& op, const Field& f, const json::Value& v,
                   const char* expected) {
    if (const int64_t* i = v.get<int64_t>()) return *i;
    if (v.get<json::Value::Big>())
        throw std::invalid_argument("[" + op + "] " + f.name + ": expected a 64-bit integer, got " +
                                    json::describe(v));
    wrong_kind(op, f, expected, v);
}

void check_minimum(const std::string& op, const Field& f, int64_t value) {
    if (value < f.minimum)
        throw std::invalid_argument("[" + op + "] " + f.name + ": expected >= " +
                                    std::to_string(f.minimum) + ", got " + std::to_string(value));
}

// The checked, normalized value of field f.
json::Value checked(const std::string& op, const Field& f, const json::Value& v) {
    switch (f.kind) {
        case FieldKind::Int: {
            const int64_t i = integer_of(op, f, v, "an int");
            check_minimum(op, f, i);
            return i;
        }
        case FieldKind::Padding:
            if (const std::string* text = v.get<std::string>()) {
                if (*text != "same" && *text != "valid")
                    throw std::invalid_argument("[" + op + "] " + f.name +
                                                ": expected 'same', 'valid', an int or a pair of "
                                                "ints, got " +
                                                json::describe(v));
                return v;
            }
            [[fallthrough]];
        case FieldKind::Pair: {
            const char* expected = f.kind == FieldKind::Padding
                                       ? "'same', 'valid', an int or a pair of ints"
                                       : "an int or a pair of ints";
            json::Array pair;
            if (const json::Array* a = v.get<json::Array>()) {
                if (a->size() != 2) wrong_kind(op, f, expected, v);
                pair = {integer_of(op, f, (*a)[0], expected), integer_of(op, f, (*a)[1], expected)};
            } else {
                const int64_t i = integer_of(op, f, v, expected);
                pair = {i, i};
            }
            for (const auto& x : pair) check_minimum(op, f, *x.get<int64_t>());
            return pair;
        }
        case FieldKind::OptionalPair: {
            const char* expected = "an int, or a pair of ints or None";
            // an element: an int >= minimum, or null
            auto element = [&](const json::Value& e) -> json::Value {
                if (e.is_null()) return nullptr;
                const int64_t i = integer_of(op, f, e, expected);
                check_minimum(op, f, i);
                return i;
            };
            if (const json::Array* a = v.get<json::Array>()) {
                if (a->size() != 2) wrong_kind(op, f, expected, v);
                return json::Array{element((*a)[0]), element((*a)[1])};
            }
            if (v.is_null()) wrong_kind(op, f, expected, v);
            const json::Value i = element(v);
            return json::Array{i, i};
        }
        case FieldKind::Bool:
            if (!v.get<bool>()) wrong_kind(op, f, "True or False", v);
            return v;
        case FieldKind::OptionalProbability:
            if (v.is_null()) return nullptr;
            [[fallthrough]];
        case FieldKind::Probability: {
            const char* expected = f.kind == FieldKind::Probability ? "a probability in [0, 1]"
                                                                    : "a number in [0, 1] or None";
            double p;
            if (const int64_t* i = v.get<int64_t>())
                p = double(*i);
            else if (const double* d = v.get<double>())
                p = *d;
            else
                wrong_kind(op, f, expected, v);
            if (!(p >= 0 && p <= 1))
                throw std::invalid_argument("[" + op + "] " + f.name + ": expected " + expected +
                                            ", got " + json::describe(v));
            return p;
        }
        case FieldKind::Number: {
            const char* expected = "a finite float";
            double x;
            if (const int64_t* i = v.get<int64_t>())
                x = double(*i);
            else if (const double* d = v.get<double>())
                x = *d;
            else
                wrong_kind(op, f, expected, v);
            if (!std::isfinite(x))
                throw std::invalid_argument("[" + op + "] " + f.name + ": expected " + expected +
                                            ", got " + json::describe(v));
            return x;
        }
        case FieldKind::Choice: {
            std::string expected;  // "'none' or 'tanh'", "'a', 'b' or 'c'"
            for (size_t i = 0; i < f.choices.size(); ++i)
                expected += (i == 0                      ? ""
                             : i + 1 == f.choices.size() ? " or "
                                                         : ", ") +
                            ("'" + f.choices[i] + "'");
            const std::string* text = v.get<std::string>();
            if (!text) wrong_kind(op, f, expected.c_str(), v);
            for (const std::string& c : f.choices)
                if (*text == c) return v;
            throw std::invalid_argument("[" + op + "] " + f.name + ": expected " + expected +
                                        ", got " + json::describe(v));
        }
        case FieldKind::Seed: {
            if (v.is_null()) return nullptr;
            const int64_t i = integer_of(op, f, v, "an int or None");
            check_minimum(op, f, i);
            return i;
        }
        case FieldKind::OptionalInt: {
            if (v.is_null()) return nullptr;
            const int64_t i = integer_of(op, f, v, "an int or None");
            if (i == 0)
                throw std::invalid_argument("[" + op + "] " + f.name +
                                            ": expected a nonzero int or None, got 0");
            return i;
        }
    }
    return v;
}

}  // namespace

const json::Value& Config::at(const std::string& name) const {
    const json::Value* v = json::find(values_, name);
    if (!v) throw std::logic_error("[" + type_ + "] no argument '" + name + "'");
    return *v;
}

int64_t Config::integer(const std::string& name) const { return *at(name).get<int64_t>(); }

std::array<int64_t, 2> Config::pair(const std::string& name) const {
    const json::Array& a = *at(name).get<json::Array>();
    return {*a[0].get<int64_t>(), *a[1].get<int64_t>()};
}

bool Config::boolean(const std::string& name) const { return *at(name).get<bool>(); }

double Config::number(const std::string& name) const { return *at(name).get<double>(); }

const std::string& Config::text(const std::string& name) const {
    return *at(name).get<std::string>();
}

std::optional<uint64_t> Config::seed(const std::string& name) const {
    const json::Value& v = at(name);
    if (v.is_null()) return std::nullopt;
    return uint64_t(*v.get<int64_t>());
}

std::optional<int64_t> Config::optional_integer(const std::string& name) const {
    const json::Value& v = at(name);
    if (v.is_null()) return std::nullopt;
    return *v.get<int64_t>();
}

std::optional<double> Config::optional_number(const std::string& name) const {
    const json::Value& v = at(name);
    if (v.is_null()) return std::nullopt;
    return *v.get<double>();
}

std::array<std::optional<int64_t>, 2> Config::optional_pair(const std::string& name) const {
    const json::Array& a = *at(name).get<json::Array>();
    std::array<std::optional<int64_t>, 2> out;
    for (size_t i = 0; i < 2; ++i)
        if (!a[i].is_null()) out[i] = *a[i].get<int64_t>();
    return out;
}

std::string Config::padding_mode(const std::string& name) const {
    const std::string* text = at(name).get<std::string>();
    return text ? *text : std::string();
}

bool Config::has(const std::string& name) const { return json::find(values_, name) != nullptr; }

void Config::set(const std::string& name, json::Value value) {
    for (auto& [key, v] : values_)
        if (key == name) {
            v = std::move(value);
            return;
        }
    values_.emplace_back(name, std::move(value));
}

Config LayerType::parse(const json::Array& positional, const json::Object& named) const {
    if (positional.size() > fields.size())
        throw argument_type_error("[" + name + "] expected at most " +
                                  std::to_string(fields.size()) + " arguments, got " +
                                  std::to_string(positional.size()));
    std::vector<const json::Value*> given(fields.size(), nullptr);
    for (size_t i = 0; i < positional.size(); ++i) given[i] = &positional[i];
    for (const auto& [key, value] : named) {
        size_t i = 0;
        while (i < fields.size() && fields[i].name != key) ++i;
        if (i == fields.size())
            throw argument_type_error("[" + name + "] got an unexpected argument '" + key + "'");
        if (given[i])
            throw argument_type_error("[" + name + "] got two values for argument '" + key + "'");
        given[i] = &value;
    }
    json::Object values;
    for (size_t i = 0; i < fields.size(); ++i) {
        const Field& f = fields[i];
        const json::Value* v = given[i];
        if (!v || (v->is_null() && !f.default_from.empty())) {
            if (!f.default_from.empty()) {
                values.emplace_back(f.name, *json::find(values, f.default_from));
                continue;
            }
            if (f.default_value.is_null() && !takes_null(f.kind))
                throw argument_type_error("[" + name + "] missing the argument '" + f.name + "'");
            v = &f.default_value;
        }
        values.emplace_back(f.name, checked(name, f, *v));
    }
    return Config(name, std::move(values));
}

template <typename T>
std::shared_ptr<Layer<T>> LayerType::build(const Config& config) const {
    if constexpr (std::is_same_v<T, float>)
        return build_f32(config);
    else
        return build_f64(config);
}

const std::vector<const LayerType*>& layer_types() { return registry(); }

const LayerType* find_layer_type(const std::string& name) {
    for (const LayerType* t : registry())
        if (t->name == name) return t;
    return nullptr;
}

const LayerType& register_layer(LayerType type) {
    if (find_layer_type(type.name))
        throw std::logic_error("[register_layer] " + type.name + " is declared twice");
    declarations().push_back(std::move(type));
    registry().push_back(&declarations().back());
    return declarations().back();
}

template <typename T>
std::shared_ptr<Layer<T>> make_layer(const std::string& type, const json::Array& positional,
                                     const json::Object& named) {
    const LayerType* t = find_layer_type(type);
    if (!t) {
        std::string known;
        for (const LayerType* k : layer_types()) known += (known.empty() ? "" : ", ") + k->name;
        throw std::invalid_argument("[make_layer] type: expected one of " + known + ", got '" +
                                    type + "'");
    }
    return t->build<T>(t->parse(positional, named));
}

template std::shared_ptr<Layer<float>> LayerType::build<float>(const Config&) const;
template std::shared_ptr<Layer<double>> LayerType::build<double>(const Config&) const;
template std::shared_ptr<Layer<float>> make_layer<float>(const std::string&, const json::Array&,
                                                         const json::Object&);
template std::shared_ptr<Layer<double>> make_layer<double>(const std::string&, const json::Array&,
                                                           const json::Object&);

}  // namespace cnnbp::nn
