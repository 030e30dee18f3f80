// Model files: the architecture (JSON, one entry per layer as the registry declares it), the
// weights and optionally an optimizer, in one .npz (see cnnbp/model_file.hpp). The archive
// itself is npz.cpp's; this file is the schema. Everything read is checked before use.
#include "cnnbp/model_file.hpp"

#include <cstring>
#include <optional>
#include <set>
#include <stdexcept>

#include "cnnbp/errors.hpp"
#include "npz.hpp"

namespace cnnbp::nn {

namespace {

constexpr const char* kFormat = "cnnbp-model";
constexpr int64_t kVersion = 1;
constexpr int64_t kOptimizerVersion = 1;

[[noreturn]] void refuse(const std::string& what) { throw std::invalid_argument("[load] " + what); }

template <typename T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "float32" : "float64";
}

template <typename T>
const char* descr_of() {
    return sizeof(T) == 4 ? "<f4" : "<f8";
}

// The JSON text held by a 1-D uint8 entry.
json::Value json_entry(const npz::Array& array, const std::string& where) {
    if (array.dtype != "uint8" || array.shape.size() != 1)
        refuse(where + ": expected a 1-D uint8 array of JSON text");
    return json::parse(std::string(reinterpret_cast<const char*>(array.data), array.bytes), where);
}

const json::Value& member(const json::Object& object, const std::string& key) {
    const json::Value* v = json::find(object, key);
    static const json::Value null;
    return v ? *v : null;
}

// The parsed archive and its architecture object.
struct Contents {
    std::string file;
    std::map<std::string, npz::Array> arrays;
    json::Object architecture;
    std::string dtype;
};

Contents read_contents(const std::string& path) {
    Contents c;
    c.file = npz::read_file(path);
    c.arrays = npz::read(c.file);
    const auto it = c.arrays.find("architecture");
    if (it == c.arrays.end()) refuse("file: expected an array 'architecture', got none");
    json::Value arch = json_entry(it->second, "architecture");
    const json::Object* object = arch.get<json::Object>();
    if (!object) refuse("architecture: expected a JSON object, got " + json::describe(arch));
    const std::string* format = member(*object, "format").get<std::string>();
    if (!format || *format != kFormat)
        refuse(std::string("architecture: expected format \"") + kFormat + "\"");
    const json::Value& version = member(*object, "version");
    if (!version.get<int64_t>() || *version.get<int64_t>() != kVersion)
        refuse("architecture: expected version " + std::to_string(kVersion) + ", got " +
               json::describe(version));
    const std::string* dtype = member(*object, "dtype").get<std::string>();
    if (!dtype || (*dtype != "float32" && *dtype != "float64"))
        refuse("architecture: expected dtype \"float32\" or \"float64\", got " +
               json::describe(member(*object, "dtype")));
    if (!member(*object, "layers").get<json::Array>())
        refuse("architecture: expected a list \"layers\"");
    c.dtype = *dtype;
    c.architecture = *object;
    return c;
}

// One entry of the architecture, checked: a declared layer (its type and arguments) or a
// container (Sequential, Residual, Concat) with the entries of its children.
struct LayerSpec {
    const LayerType* declared = nullptr;  // a declared layer; null for a container
    std::optional<Config> config;
    std::string container;  // "Sequential", "Residual" or "Concat"
    std::vector<LayerSpec> children;
    bool has_shortcut = false;  // Residual: children are block, then the shortcut if any
};

// The containers' entries: {"type": "Sequential", "layers": [...]}, {"type": "Residual",
// "block": {...}, "shortcut": {...} or null}, {"type": "Concat", "branches": [...]}.
const char* container_member(const std::string& type) {
    if (type == "Sequential") return "layers";
    if (type == "Concat") return "branches";
    return nullptr;
}

// The entry at `where` ("layer 3.block.1") checked, the weights it asks for counted against
// `budget` (the file's size) before anything is allocated.
LayerSpec parse_entry(const json::Value& value, const std::string& where, int64_t& budget,
                      size_t file_size) {
    const std::string at = "architecture: layer " + where;
    const json::Object* entry = value.get<json::Object>();
    const std::string* type = entry ? member(*entry, "type").get<std::string>() : nullptr;
    if (!type) refuse(at + ": expected an object with a string \"type\"");
    LayerSpec spec;
    if (*type == "Sequential" || *type == "Concat" || *type == "Residual") {
        spec.container = *type;
        const bool residual = *type == "Residual";
        for (const auto& [key, v] : *entry)
            if (key != "type" &&
                (residual ? key != "block" && key != "shortcut" : key != container_member(*type)))
                refuse(at + ": expected the fields of " + *type + ", got also \"" +
                       json::printable(key) + "\"");
        if (residual) {
            spec.children.push_back(
                parse_entry(member(*entry, "block"), where + ".block", budget, file_size));
            const json::Value& shortcut = member(*entry, "shortcut");
            spec.has_shortcut = !shortcut.is_null();
            if (spec.has_shortcut)
                spec.children.push_back(
                    parse_entry(shortcut, where + ".shortcut", budget, file_size));
            return spec;
        }
        const json::Array* children = member(*entry, container_member(*type)).get<json::Array>();
        if (!children)
            refuse(at + ": expected a list \"" + container_member(*type) + "\" in a " + *type);
        for (size_t i = 0; i < children->size(); ++i)
            spec.children.push_back(
                parse_entry((*children)[i], where + "." + std::to_string(i), budget, file_size));
        return spec;
    }
    const LayerType* declared = find_layer_type(*type);
    if (!declared) refuse(at + ": expected a known layer type, got " + json::describe(*type));
    json::Object arguments;
    for (const auto& [key, v] : *entry) {
        if (key == "type") continue;
        bool saved = false;
        for (const Field& f : declared->fields) saved |= f.saved && f.name == key;
        if (!saved)
            refuse(at + ": expected the fields of " + *type + ", got also \"" +
                   json::printable(key) + "\"");
        arguments.emplace_back(key, v);
    }
    try {
        Config config = declared->parse({}, arguments);
        const int64_t count = declared->parameter_count ? declared->parameter_count(config) : 0;
        if (count > budget)
            refuse(at + ": expected weights that fit in the file, got " + std::to_string(count) +
                   " values in a file of " + std::to_string(file_size) + " bytes");
        budget -= count;
        spec.declared = declared;
        spec.config = std::move(config);
    } catch (const std::invalid_argument& e) {
        const std::string what = e.what();
        if (what.rfind("[load]", 0) == 0) throw;
        refuse(at + ": " + what);
    }
    return spec;
}

template <typename T>
std::shared_ptr<Layer<T>> build_entry(const LayerSpec& spec, const std::string& where) {
    if (spec.declared) {
        try {
            return spec.declared->template build<T>(*spec.config);
        } catch (const std::invalid_argument& e) {
            refuse("architecture: layer " + where + ": " + e.what());
        }
    }
    if (spec.container == "Residual")
        return std::make_shared<Residual<T>>(
            build_entry<T>(spec.children[0], where + ".block"),
            spec.has_shortcut ? build_entry<T>(spec.children[1], where + ".shortcut") : nullptr);
    std::vector<std::shared_ptr<Layer<T>>> children;
    for (size_t i = 0; i < spec.children.size(); ++i)
        children.push_back(build_entry<T>(spec.children[i], where + "." + std::to_string(i)));
    if (spec.container == "Concat") {
        try {
            return std::make_shared<Concat<T>>(std::move(children));
        } catch (const std::invalid_argument& e) {
            refuse("architecture: layer " + where + ": " + e.what());
        }
    }
    auto sequential = std::make_shared<Sequential<T>>();
    for (auto& child : children) sequential->add(std::move(child));
    return sequential;
}

// The layers of the architecture, built, with the weights the file holds for them.
template <typename T>
Sequential<T> build_model(const Contents& c) {
    if (c.dtype != dtype_name<T>())
        refuse(std::string("dtype: expected ") + dtype_name<T>() + ", got " + c.dtype);
    const json::Array& layers = *json::find(c.architecture, "layers")->get<json::Array>();
    // every entry checked and its weights counted before anything is built
    std::vector<LayerSpec> specs;
    int64_t budget = int64_t(c.file.size() / sizeof(T));
    for (size_t i = 0; i < layers.size(); ++i)
        specs.push_back(parse_entry(layers[i], std::to_string(i), budget, c.file.size()));
    Sequential<T> model;
    for (size_t i = 0; i < specs.size(); ++i)
        model.add(build_entry<T>(specs[i], std::to_string(i)));
    std::set<std::string> expected{"architecture"};
    for (auto& [name, p] : model.named_parameters()) {
        expected.insert(name);
        const auto it = c.arrays.find(name);
        if (it == c.arrays.end()) refuse(name + ": expected an array, got none");
        const npz::Array& a = it->second;
        if (a.dtype != dtype_name<T>())
            refuse(name + ": expected dtype " + dtype_name<T>() + ", got " + a.dtype);
        if (a.shape != p->value.shape)
            refuse(name + ": expected shape " + shape_str(p->value.shape) + ", got shape " +
                   shape_str(a.shape));
        std::memcpy(p->value.data.data(), a.data, a.bytes);
    }
    for (auto& [name, b] : model.named_buffers()) {  // as the parameters; a counter is int64
        expected.insert(name);
        const auto it = c.arrays.find(name);
        if (it == c.arrays.end()) refuse(name + ": expected an array, got none");
        const npz::Array& a = it->second;
        const char* dtype = b.values ? dtype_name<T>() : "int64";
        const Shape& shape = b.values ? b.values->shape : b.counts->shape;
        if (a.dtype != dtype) refuse(name + ": expected dtype " + dtype + ", got " + a.dtype);
        if (a.shape != shape)
            refuse(name + ": expected shape " + shape_str(shape) + ", got shape " +
                   shape_str(a.shape));
        std::memcpy(b.values ? static_cast<void*>(b.values->data.data()) : b.counts->data.data(),
                    a.data, a.bytes);
    }
    std::string extra;
    for (const auto& [name, a] : c.arrays)
        if (!expected.count(name) && name != "optimizer" && name.rfind("optimizer.", 0) != 0)
            extra += (extra.empty() ? "'" : ", '") + name + "'";
    if (!extra.empty())
        refuse("file: expected only the architecture's arrays, got also [" + extra + "]");
    return model;
}

// ---- the optimizer beside the model ----------------------------------------------------------

// Each optimizer's settings, explicitly: a file keeps exactly these (version 1).
const std::vector<std::string>& optimizer_schema(const std::string& type) {
    static const std::vector<std::string> sgd{"momentum", "weight_decay", "dampening", "nesterov"};
    static const std::vector<std::string> adam{"betas", "eps", "weight_decay"};
    static const std::vector<std::string> none;
    if (type == "SGD") return sgd;
    if (type == "Adam" || type == "AdamW") return adam;
    return none;
}

// the state arrays a parameter of this optimizer may have
std::vector<std::string> state_keys(const std::string& type) {
    if (type == "SGD") return {"momentum_buffer"};
    return {"exp_avg", "exp_avg_sq"};
}

double number_of(const json::Value& v, const std::string& name) {
    if (const int64_t* i = v.get<int64_t>()) return double(*i);
    if (const double* d = v.get<double>()) return *d;
    refuse("optimizer: " + name + ": expected a number, got " + json::describe(v));
}

template <typename T>
std::shared_ptr<Optimizer<T>> build_optimizer(const json::Object& settings,
                                              std::vector<Parameter<T>*> params) {
    const std::string* type = member(settings, "type").get<std::string>();
    if (!type || optimizer_schema(*type).empty())
        refuse("optimizer: expected type SGD, Adam or AdamW, got " +
               json::describe(member(settings, "type")));
    const json::Value& version = member(settings, "version");
    if (!version.is_null() &&
        !(version.get<int64_t>() && *version.get<int64_t>() == kOptimizerVersion))
        refuse("optimizer: expected version " + std::to_string(kOptimizerVersion) + ", got " +
               json::describe(version));
    const json::Object* hyper = member(settings, "hyperparameters").get<json::Object>();
    std::set<std::string> keys,
        wanted(optimizer_schema(*type).begin(), optimizer_schema(*type).end());
    if (hyper)
        for (const auto& kv : *hyper) keys.insert(kv.first);
    if (!hyper || keys != wanted) {
        std::string names;
        for (const auto& k : wanted) names += (names.empty() ? "" : ", ") + k;
        refuse("optimizer: expected hyperparameters " + names + ", got " +
               json::describe(member(settings, "hyperparameters")));
    }
    auto get = [&](const char* key) { return number_of(*json::find(*hyper, key), key); };
    const double lr = number_of(member(settings, "lr"), "lr");
    if (*type == "SGD") {
        const bool* nesterov = json::find(*hyper, "nesterov")->get<bool>();
        if (!nesterov) refuse("optimizer: nesterov: expected true or false");
        return std::make_shared<SGD<T>>(std::move(params), lr, get("momentum"), get("weight_decay"),
                                        get("dampening"), *nesterov);
    }
    const json::Array* betas = json::find(*hyper, "betas")->get<json::Array>();
    if (!betas || betas->size() != 2) refuse("optimizer: betas: expected a pair of numbers");
    const double b1 = number_of((*betas)[0], "betas"), b2 = number_of((*betas)[1], "betas");
    if (*type == "Adam")
        return std::make_shared<Adam<T>>(std::move(params), lr, b1, b2, get("eps"),
                                         get("weight_decay"));
    return std::make_shared<AdamW<T>>(std::move(params), lr, b1, b2, get("eps"),
                                      get("weight_decay"));
}

// a state array of parameter i, checked against the parameter's shape and dtype
template <typename T>
std::vector<T> state_array(const npz::Array& a, const Parameter<T>& p, const std::string& name) {
    if (a.dtype != dtype_name<T>())
        refuse("optimizer: " + name + ": expected dtype " + dtype_name<T>() + ", got " + a.dtype);
    if (a.shape != p.value.shape)
        refuse("optimizer: " + name + ": expected shape " + shape_str(p.value.shape) +
               ", got shape " + shape_str(a.shape));
    std::vector<T> out(size_t(numel(a.shape)));
    std::memcpy(out.data(), a.data, a.bytes);
    return out;
}

template <typename T>
std::shared_ptr<Optimizer<T>> load_optimizer(const Contents& c, Sequential<T>& model) {
    const auto it = c.arrays.find("optimizer");
    if (it == c.arrays.end()) {
        for (const auto& [name, a] : c.arrays)
            if (name.rfind("optimizer.", 0) == 0)
                refuse("file: expected optimizer state with its settings, got only " + name);
        return nullptr;
    }
    json::Value settings_value = json_entry(it->second, "optimizer");
    const json::Object* settings = settings_value.get<json::Object>();
    if (!settings) refuse("optimizer: expected a JSON object");
    std::vector<Parameter<T>*> params = model.parameters();
    std::shared_ptr<Optimizer<T>> opt;
    try {
        opt = build_optimizer<T>(*settings, params);
    } catch (const std::invalid_argument& e) {
        const std::string what = e.what();
        if (what.rfind("[load]", 0) == 0) throw;
        refuse("optimizer: " + what);
    }
    const json::Array* steps = member(*settings, "steps").get<json::Array>();
    if (!steps || steps->size() != params.size())
        refuse("optimizer: expected one step count per parameter (" +
               std::to_string(params.size()) + ")");
    const std::vector<std::string> keys = state_keys(opt->type());
    std::set<std::string> known;
    for (size_t i = 0; i < params.size(); ++i)
        for (const auto& key : keys) known.insert("optimizer." + std::to_string(i) + "." + key);
    for (const auto& [name, a] : c.arrays)
        if (name.rfind("optimizer.", 0) == 0 && !known.count(name))
            refuse("optimizer: expected state arrays of " + opt->type() + ", got " + name);
    auto array = [&](size_t i, const std::string& key) -> const npz::Array* {
        const auto found = c.arrays.find("optimizer." + std::to_string(i) + "." + key);
        return found == c.arrays.end() ? nullptr : &found->second;
    };
    for (size_t i = 0; i < params.size(); ++i) {
        const std::string prefix = "optimizer." + std::to_string(i) + ".";
        if (auto* sgd = dynamic_cast<SGD<T>*>(opt.get())) {
            if (!(*steps)[i].is_null()) refuse("optimizer: SGD keeps no step counts");
            if (const npz::Array* a = array(i, "momentum_buffer"))
                sgd->momentum_buffers()[i] =
                    state_array(*a, *params[i], prefix + "momentum_buffer");
            continue;
        }
        auto* adam = dynamic_cast<Adam<T>*>(opt.get());
        const json::Value& step = (*steps)[i];
        const npz::Array *m = array(i, "exp_avg"), *v = array(i, "exp_avg_sq");
        if (step.is_null()) {
            if (m || v)
                refuse("optimizer: " + prefix + "exp_avg: expected no moments without a step");
            continue;
        }
        if (!step.get<int64_t>() || *step.get<int64_t>() < 0)
            refuse("optimizer: steps: expected counts >= 0 or null, got " + json::describe(step));
        if (*step.get<int64_t>() > 0 && !(m && v))
            refuse("optimizer: " + prefix + "exp_avg: expected both moments for a step > 0");
        adam->steps()[i] = *step.get<int64_t>();
        if (m) adam->first_moments()[i] = state_array(*m, *params[i], prefix + "exp_avg");
        if (v) adam->second_moments()[i] = state_array(*v, *params[i], prefix + "exp_avg_sq");
    }
    return opt;
}

// The architecture entry of a layer (see LayerSpec); where: its dotted path, for messages.
template <typename T>
json::Object entry_of(Layer<T>& layer, const std::string& where) {
    if (auto* residual = dynamic_cast<Residual<T>*>(&layer))
        return {{"type", "Residual"},
                {"block", entry_of(*residual->block(), where + ".block")},
                {"shortcut", residual->shortcut()
                                 ? json::Value(entry_of(*residual->shortcut(), where + ".shortcut"))
                                 : json::Value(nullptr)}};
    if (auto* container = dynamic_cast<Container<T>*>(&layer)) {
        const char* list = container_member(container->type());
        if (!list)
            throw std::invalid_argument("[save] layer " + where +
                                        ": expected a container cnnbp declares, got " +
                                        container->type());
        json::Array children;
        for (const auto& [name, child] : container->named_children())
            children.push_back(entry_of(*child, where + "." + name));
        return {{"type", container->type()}, {list, std::move(children)}};
    }
    if (!layer.arguments())
        throw std::invalid_argument("[save] layer " + where +
                                    ": expected a layer type cnnbp declares, got " + layer.type());
    return layer.config();
}

}  // namespace

std::string model_file_dtype(const std::string& path) { return read_contents(path).dtype; }

template <typename T>
void save(Sequential<T>& model, const std::string& path, const Optimizer<T>* optimizer) {
    json::Array layers;
    for (size_t i = 0; i < model.size(); ++i)
        layers.push_back(entry_of(model[i], std::to_string(i)));
    const json::Object architecture{{"format", kFormat},
                                    {"version", kVersion},
                                    {"dtype", dtype_name<T>()},
                                    {"layers", std::move(layers)}};
    const std::string arch = json::dump(architecture);
    std::vector<npz::Entry> entries{
        {"architecture", "|u1", {int64_t(arch.size())}, arch.data(), arch.size()}};
    auto add = [&](std::string name, const Shape& shape, const T* data) {
        entries.push_back(
            {std::move(name), descr_of<T>(), shape, data, size_t(numel(shape)) * sizeof(T)});
    };
    for (auto& [name, p] : model.named_parameters())
        add(name, p->value.shape, p->value.data.data());
    for (auto& [name, b] : model.named_buffers()) {
        if (b.values) {
            add(name, b.values->shape, b.values->data.data());
            continue;
        }
        entries.push_back({name, "<i8", b.counts->shape, b.counts->data.data(),
                           size_t(numel(b.counts->shape)) * sizeof(int64_t)});
    }
    std::string settings_text;
    if (optimizer) {
        if (optimizer->parameters() != model.parameters())
            throw std::invalid_argument(
                "[save] optimizer: expected an optimizer over this model's parameters, in order");
        json::Array steps;
        const auto& params = optimizer->parameters();
        for (size_t i = 0; i < params.size(); ++i) {
            const std::string prefix = "optimizer." + std::to_string(i) + ".";
            if (auto* sgd = dynamic_cast<const SGD<T>*>(optimizer)) {
                steps.push_back(nullptr);
                const auto& buffer = sgd->momentum_buffers()[i];
                if (!buffer.empty())
                    add(prefix + "momentum_buffer", params[i]->value.shape, buffer.data());
            } else if (auto* adam = dynamic_cast<const Adam<T>*>(optimizer)) {
                const Adam<T>& a = *adam;
                if (a.steps()[i] == 0) {
                    steps.push_back(nullptr);
                    continue;
                }
                steps.push_back(a.steps()[i]);
                add(prefix + "exp_avg", params[i]->value.shape, a.first_moments()[i].data());
                add(prefix + "exp_avg_sq", params[i]->value.shape, a.second_moments()[i].data());
            }
        }
        settings_text = json::dump(json::Object{{"type", optimizer->type()},
                                                {"version", kOptimizerVersion},
                                                {"lr", optimizer->lr()},
                                                {"hyperparameters", optimizer->settings()},
                                                {"steps", std::move(steps)}});
        entries.push_back({"optimizer",
                           "|u1",
                           {int64_t(settings_text.size())},
                           settings_text.data(),
                           settings_text.size()});
    }
    npz::write(path, entries);
}

template <typename T>
Sequential<T> load(const std::string& path) {
    return build_model<T>(read_contents(path));
}

template <typename T>
Checkpoint<T> load_checkpoint(const std::string& path) {
    const Contents c = read_contents(path);
    Checkpoint<T> out{build_model<T>(c), nullptr};
    out.optimizer = load_optimizer<T>(c, out.model);
    return out;
}

#define CNNBP_INSTANTIATE(T)                                                        \
    template void save<T>(Sequential<T>&, const std::string&, const Optimizer<T>*); \
    template Sequential<T> load<T>(const std::string&);                             \
    template Checkpoint<T> load_checkpoint<T>(const std::string&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp::nn
