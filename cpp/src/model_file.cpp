// Model files: an uncompressed .npz of the architecture JSON and the weights (see
// cnnbp/model_file.hpp). Everything read from a file is checked before it is used.
#include "cnnbp/model_file.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <variant>

namespace cnnbp::nn {

namespace {

[[noreturn]] void refuse(const std::string& what) { throw std::invalid_argument("[load] " + what); }

// ---- a minimal JSON reader and writer for the architecture --------------------------------

struct Json;
using JsonObject = std::map<std::string, Json>;
using JsonArray = std::vector<Json>;
struct Json {
    std::variant<std::nullptr_t, bool, double, std::string, JsonArray, JsonObject> value;
};

class JsonParser {
 public:
    explicit JsonParser(const std::string& text) : text_(text) {}
    Json parse() {
        Json v = value(0);
        skip_space();
        if (pos_ != text_.size()) fail("trailing characters");
        return v;
    }

 private:
    const std::string& text_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) {
        refuse("architecture: expected valid JSON, got " + what + " at character " +
               std::to_string(pos_));
    }
    void skip_space() {
        while (pos_ < text_.size() && std::strchr(" \t\r\n", text_[pos_])) ++pos_;
    }
    bool consume(char c) {
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == c) return ++pos_, true;
        return false;
    }
    Json value(int depth) {
        if (depth > 32) fail("nesting deeper than 32");
        skip_space();
        if (pos_ >= text_.size()) fail("the end of the text");
        const char c = text_[pos_];
        if (c == '{') {
            ++pos_;
            JsonObject object;
            if (consume('}')) return {object};
            do {
                skip_space();
                std::string key = string();
                if (!consume(':')) fail("a missing ':'");
                object[key] = value(depth + 1);
            } while (consume(','));
            if (!consume('}')) fail("a missing '}'");
            return {object};
        }
        if (c == '[') {
            ++pos_;
            JsonArray array;
            if (consume(']')) return {array};
            do array.push_back(value(depth + 1));
            while (consume(','));
            if (!consume(']')) fail("a missing ']'");
            return {array};
        }
        if (c == '"') return {string()};
        for (const char* word : {"true", "false", "null"})
            if (text_.compare(pos_, std::strlen(word), word) == 0) {
                pos_ += std::strlen(word);
                if (word[0] == 'n') return {nullptr};
                return {word[0] == 't'};
            }
        const size_t start = pos_;
        while (pos_ < text_.size() && std::strchr("+-0123456789.eE", text_[pos_])) ++pos_;
        if (start == pos_) fail(std::string("an unexpected character '") + c + "'");
        try {
            size_t used = 0;
            const double number = std::stod(text_.substr(start, pos_ - start), &used);
            if (used != pos_ - start) fail("a malformed number");
            return {number};
        } catch (const std::logic_error&) {
            fail("a malformed number");
        }
    }
    std::string string() {
        if (pos_ >= text_.size() || text_[pos_] != '"') fail("a missing string");
        ++pos_;
        std::string out;
        while (pos_ < text_.size() && text_[pos_] != '"') {
            char c = text_[pos_++];
            if (c == '\\') {
                if (pos_ >= text_.size()) break;
                const char e = text_[pos_++];
                const char* from = "\"\\/bfnrt";
                const char* to = "\"\\/\b\f\n\r\t";
                const char* hit = std::strchr(from, e);
                if (!hit || !*hit) fail("an unsupported escape");
                c = to[hit - from];
            }
            out += c;
        }
        if (pos_ >= text_.size()) fail("an unterminated string");
        ++pos_;
        return out;
    }
};

const Json& field(const JsonObject& object, const std::string& key, const std::string& where) {
    const auto it = object.find(key);
    if (it == object.end()) refuse(where + ": expected a field \"" + key + "\"");
    return it->second;
}

int64_t as_int(const Json& j, const std::string& where) {
    const double* d = std::get_if<double>(&j.value);
    if (!d || *d != std::floor(*d) || *d < 0 || *d > 1e12)
        refuse(where + ": expected a non-negative integer");
    return int64_t(*d);
}

std::array<int64_t, 2> as_pair(const Json& j, const std::string& where) {
    const JsonArray* a = std::get_if<JsonArray>(&j.value);
    if (!a || a->size() != 2) refuse(where + ": expected a pair of integers");
    return {as_int((*a)[0], where), as_int((*a)[1], where)};
}

double as_probability(const Json& j, const std::string& where) {
    const double* d = std::get_if<double>(&j.value);
    if (!d || !(*d >= 0 && *d <= 1)) refuse(where + ": expected a number in [0, 1]");
    return *d;
}

bool as_bool(const Json& j, const std::string& where) {
    const bool* b = std::get_if<bool>(&j.value);
    if (!b) refuse(where + ": expected true or false");
    return *b;
}

std::string pair_json(int64_t a, int64_t b) {
    return "[" + std::to_string(a) + ", " + std::to_string(b) + "]";
}

// ---- .npy ---------------------------------------------------------------------------------

struct Npy {
    std::string descr;  // "<f4", "<f8", "|u1"
    Shape shape;
    const unsigned char* data = nullptr;
    size_t bytes = 0;
};

size_t item_size(const std::string& descr) {
    if (descr == "<f4") return 4;
    if (descr == "<f8") return 8;
    if (descr == "|u1") return 1;
    return 0;
}

// A .npy held in `bytes`: version 1, 2 or 3 header, a plain little-endian dtype, C order.
Npy parse_npy(const std::string& name, const unsigned char* bytes, size_t size) {
    const std::string where = name;
    if (size < 10 || std::memcmp(bytes, "\x93NUMPY", 6) != 0)
        refuse(where + ": expected a .npy array, got other bytes");
    const unsigned major = bytes[6];
    size_t header_len, offset;
    if (major == 1) {
        header_len = size_t(bytes[8]) | size_t(bytes[9]) << 8;
        offset = 10;
    } else if (major == 2 || major == 3) {
        if (size < 12) refuse(where + ": truncated .npy header");
        header_len = size_t(bytes[8]) | size_t(bytes[9]) << 8 | size_t(bytes[10]) << 16 |
                     size_t(bytes[11]) << 24;
        offset = 12;
    } else {
        refuse(where + ": expected .npy format version 1 to 3, got " + std::to_string(major));
    }
    if (header_len > size - offset) refuse(where + ": truncated .npy header");
    const std::string header(reinterpret_cast<const char*>(bytes + offset), header_len);
    auto after = [&](const std::string& key) {
        const size_t at = header.find("'" + key + "':");
        if (at == std::string::npos) refuse(where + ": .npy header lacks '" + key + "'");
        size_t p = at + key.size() + 3;
        while (p < header.size() && header[p] == ' ') ++p;
        return p;
    };
    Npy npy;
    size_t p = after("descr");
    if (p >= header.size() || header[p] != '\'') refuse(where + ": malformed .npy descr");
    const size_t end = header.find('\'', p + 1);
    if (end == std::string::npos) refuse(where + ": malformed .npy descr");
    npy.descr = header.substr(p + 1, end - p - 1);
    if (!item_size(npy.descr))
        refuse(where + ": expected dtype float32, float64 or uint8, got '" + npy.descr +
               "' (object and pickled arrays are never loaded)");
    p = after("fortran_order");
    if (header.compare(p, 5, "False") != 0) refuse(where + ": expected C order, got Fortran order");
    p = after("shape");
    if (p >= header.size() || header[p] != '(') refuse(where + ": malformed .npy shape");
    const size_t close = header.find(')', p);
    if (close == std::string::npos) refuse(where + ": malformed .npy shape");
    std::stringstream dims(header.substr(p + 1, close - p - 1));
    std::string dim;
    while (std::getline(dims, dim, ',')) {
        const size_t first = dim.find_first_not_of(' ');
        if (first == std::string::npos) continue;
        if (dim.find_first_not_of(" 0123456789") != std::string::npos || dim.size() - first > 12)
            refuse(where + ": malformed .npy shape");
        npy.shape.push_back(std::stoll(dim));
    }
    const size_t count = size_t(checked_numel("load", (where + ": shape").c_str(), npy.shape));
    npy.data = bytes + offset + header_len;
    npy.bytes = size - offset - header_len;
    if (npy.bytes != count * item_size(npy.descr))
        refuse(where + ": expected " + std::to_string(count * item_size(npy.descr)) +
               " bytes of data for shape " + shape_str(npy.shape) + ", got " +
               std::to_string(npy.bytes));
    return npy;
}

std::string npy_bytes(const std::string& descr, const Shape& shape, const void* data,
                      size_t bytes) {
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + ", ";
    if (shape.size() > 1) dims.erase(dims.size() - 2);
    if (shape.size() == 1) dims.pop_back();
    std::string header =
        "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    // pad so the data starts on a 64-byte boundary, as NumPy writes it
    const size_t total = (10 + header.size() + 1 + 63) / 64 * 64;
    header.append(total - 10 - header.size() - 1, ' ');
    header += '\n';
    std::string out("\x93NUMPY\x01\x00", 8);
    out += char(header.size() & 0xff);
    out += char(header.size() >> 8);
    out += header;
    out.append(static_cast<const char*>(data), bytes);
    return out;
}

// ---- zip (stored entries only) ---------------------------------------------------------------

uint32_t crc32(const unsigned char* bytes, size_t size) {
    static uint32_t table[256] = {};
    if (!table[1])
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < size; ++i) crc = table[(crc ^ bytes[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

void put(std::string& out, uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) out += char((value >> (8 * i)) & 0xff);
}

uint64_t get(const unsigned char* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
    return v;
}

std::string zip(const std::vector<std::pair<std::string, std::string>>& entries) {
    std::string out, directory;
    for (const auto& [name, data] : entries) {
        if (data.size() >= 0xFFFFFFFFu || out.size() >= 0xFFFFFFFFu)
            throw std::invalid_argument("[save] model: expected under 4 GiB, got more");
        const uint32_t crc =
            crc32(reinterpret_cast<const unsigned char*>(data.data()), data.size());
        const uint64_t offset = out.size();
        put(out, 0x04034b50, 4), put(out, 20, 2), put(out, 0, 2), put(out, 0, 2);
        put(out, 0, 2), put(out, 0x21, 2);  // time, date: 1980-01-01
        put(out, crc, 4), put(out, data.size(), 4), put(out, data.size(), 4);
        put(out, name.size(), 2), put(out, 0, 2);
        out += name;
        out += data;
        put(directory, 0x02014b50, 4), put(directory, 20, 2), put(directory, 20, 2);
        put(directory, 0, 2), put(directory, 0, 2), put(directory, 0, 2), put(directory, 0x21, 2);
        put(directory, crc, 4), put(directory, data.size(), 4), put(directory, data.size(), 4);
        put(directory, name.size(), 2), put(directory, 0, 2), put(directory, 0, 2);
        put(directory, 0, 2), put(directory, 0, 2), put(directory, 0, 4);
        put(directory, offset, 4);
        directory += name;
    }
    const uint64_t directory_offset = out.size();
    out += directory;
    put(out, 0x06054b50, 4), put(out, 0, 2), put(out, 0, 2);
    put(out, entries.size(), 2), put(out, entries.size(), 2);
    put(out, directory.size(), 4), put(out, directory_offset, 4), put(out, 0, 2);
    return out;
}

// name -> bytes of every stored entry, through the central directory (zip64 sizes too).
std::map<std::string, std::pair<const unsigned char*, size_t>> unzip(const std::string& file) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(file.data());
    const size_t size = file.size();
    if (size < 22)
        refuse("file: expected a .npz (zip) archive, got " + std::to_string(size) + " bytes");
    size_t eocd = std::string::npos;
    for (size_t i = size - 22 + 1; i-- > 0 && size - i <= 22 + 0xFFFF;)
        if (get(bytes + i, 4) == 0x06054b50) {
            eocd = i;
            break;
        }
    if (eocd == std::string::npos)
        refuse("file: expected a .npz (zip) archive, got no zip directory (truncated?)");
    const uint64_t count = get(bytes + eocd + 10, 2);
    const uint64_t dir_size = get(bytes + eocd + 12, 4), dir_offset = get(bytes + eocd + 16, 4);
    if (dir_offset > eocd || dir_size > eocd - dir_offset) refuse("file: corrupt zip directory");
    std::map<std::string, std::pair<const unsigned char*, size_t>> out;
    size_t p = dir_offset;
    for (uint64_t e = 0; e < count; ++e) {
        if (p + 46 > dir_offset + dir_size || get(bytes + p, 4) != 0x02014b50)
            refuse("file: corrupt zip directory");
        const uint64_t flags = get(bytes + p + 8, 2), method = get(bytes + p + 10, 2);
        const uint64_t crc = get(bytes + p + 16, 4);
        uint64_t compressed = get(bytes + p + 20, 4), uncompressed = get(bytes + p + 24, 4);
        const uint64_t name_len = get(bytes + p + 28, 2), extra_len = get(bytes + p + 30, 2),
                       comment_len = get(bytes + p + 32, 2);
        uint64_t local = get(bytes + p + 42, 4);
        if (p + 46 + name_len + extra_len + comment_len > dir_offset + dir_size)
            refuse("file: corrupt zip directory");
        const std::string name(reinterpret_cast<const char*>(bytes + p + 46), name_len);
        // zip64: the sizes and offset that overflowed 32 bits follow in extra field 0x0001
        const size_t extra_end = p + 46 + name_len + extra_len;
        for (size_t x = p + 46 + name_len; x + 4 <= extra_end;) {
            const uint64_t id = get(bytes + x, 2), len = get(bytes + x + 2, 2);
            if (x + 4 + len > extra_end) refuse(name + ": corrupt zip extra field");
            size_t y = x + 4;
            if (id == 1) {
                for (uint64_t* v : {&uncompressed, &compressed, &local})
                    if (*v == 0xFFFFFFFFu && y + 8 <= x + 4 + len) *v = get(bytes + y, 8), y += 8;
            }
            x += 4 + len;
        }
        if (method != 0 || (flags & 1))
            refuse(name + ": expected an uncompressed, unencrypted entry (np.savez), got method " +
                   std::to_string(method));
        if (compressed != uncompressed) refuse(name + ": corrupt zip sizes");
        if (local + 30 > size || get(bytes + local, 4) != 0x04034b50)
            refuse(name + ": corrupt zip entry");
        const uint64_t start = local + 30 + get(bytes + local + 26, 2) + get(bytes + local + 28, 2);
        if (start > size || compressed > size - start)
            refuse(name + ": entry runs past the file (truncated?)");
        if (crc32(bytes + start, size_t(compressed)) != crc)
            refuse(name + ": checksum mismatch (the file is damaged)");
        if (!out.emplace(name, std::make_pair(bytes + start, size_t(compressed))).second)
            refuse(name + ": appears twice");
        p += 46 + name_len + extra_len + comment_len;
    }
    return out;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) refuse("path: cannot open '" + path + "'");
    std::ostringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

template <typename T>
const char* descr_of() {
    return sizeof(T) == 4 ? "<f4" : "<f8";
}

template <typename T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "float32" : "float64";
}

// The architecture of a file: its JSON object, checked for the format and version.
JsonObject architecture(
    const std::map<std::string, std::pair<const unsigned char*, size_t>>& entries) {
    const auto it = entries.find("architecture.npy");
    if (it == entries.end()) refuse("file: expected an array 'architecture', got none");
    const Npy npy = parse_npy("architecture", it->second.first, it->second.second);
    if (npy.descr != "|u1" || npy.shape.size() != 1)
        refuse("architecture: expected a 1-D uint8 array of JSON text");
    const std::string text(reinterpret_cast<const char*>(npy.data), npy.bytes);
    Json json = JsonParser(text).parse();
    JsonObject* object = std::get_if<JsonObject>(&json.value);
    if (!object) refuse("architecture: expected a JSON object");
    const std::string* format =
        std::get_if<std::string>(&field(*object, "format", "architecture").value);
    if (!format || *format != "cnnbp-model")
        refuse("architecture: expected format \"cnnbp-model\"");
    if (as_int(field(*object, "version", "architecture"), "architecture: version") != 1)
        refuse("architecture: expected version 1");
    return *object;
}

}  // namespace

std::string model_file_dtype(const std::string& path) {
    const std::string file = read_file(path);
    const JsonObject arch = architecture(unzip(file));
    const std::string* dtype =
        std::get_if<std::string>(&field(arch, "dtype", "architecture").value);
    if (!dtype || (*dtype != "float32" && *dtype != "float64"))
        refuse("architecture: expected dtype \"float32\" or \"float64\"");
    return *dtype;
}

static std::string pool_json(const Pool2dParams& p) {
    return ", \"kernel_size\": " + pair_json(p.kernel_h, p.kernel_w) +
           ", \"stride\": " + pair_json(p.stride_h, p.stride_w) +
           ", \"padding\": " + pair_json(p.pad_h, p.pad_w);
}

template <typename T>
void save(Sequential<T>& model, const std::string& path) {
    std::string layers;
    for (size_t i = 0; i < model.size(); ++i) {
        Layer<T>& layer = model[i];
        std::string json = "{\"type\": \"" + layer.type() + "\"";
        if (auto* conv = dynamic_cast<Conv2d<T>*>(&layer)) {
            const Shape& w = conv->weight.value.shape;
            const auto& p = conv->params;
            json += ", \"in_channels\": " + std::to_string(w[1]) +
                    ", \"out_channels\": " + std::to_string(w[0]) +
                    ", \"kernel_size\": " + pair_json(w[2], w[3]) +
                    ", \"stride\": " + pair_json(p.stride_h, p.stride_w) +
                    ", \"padding\": " + pair_json(p.pad_h, p.pad_w) +
                    ", \"bias\": " + (conv->has_bias() ? "true" : "false");
        } else if (auto* fc = dynamic_cast<Linear<T>*>(&layer)) {
            const Shape& w = fc->weight.value.shape;
            json += ", \"in_features\": " + std::to_string(w[1]) +
                    ", \"out_features\": " + std::to_string(w[0]) +
                    ", \"bias\": " + (fc->has_bias() ? "true" : "false");
        } else if (auto* pool = dynamic_cast<MaxPool2d<T>*>(&layer)) {
            json += pool_json(pool->params);
        } else if (auto* avg = dynamic_cast<AvgPool2d<T>*>(&layer)) {
            json += pool_json(avg->params);
        } else if (auto* dropout = dynamic_cast<Dropout<T>*>(&layer)) {
            json += ", \"p\": " + number_str(dropout->p());
        }
        layers += (i ? ", " : "") + json + "}";
    }
    const std::string arch = std::string("{\"format\": \"cnnbp-model\", \"version\": 1, ") +
                             "\"dtype\": \"" + dtype_name<T>() + "\", \"layers\": [" + layers +
                             "]}";
    std::vector<std::pair<std::string, std::string>> entries;
    entries.emplace_back("architecture.npy",
                         npy_bytes("|u1", {int64_t(arch.size())}, arch.data(), arch.size()));
    for (auto& [name, p] : model.named_parameters())
        entries.emplace_back(name + ".npy",
                             npy_bytes(descr_of<T>(), p->value.shape, p->value.data.data(),
                                       p->value.data.size() * sizeof(T)));
    const std::string bytes = zip(entries);
    const std::string temporary = path + ".tmp";
    {
        std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
        out.write(bytes.data(), std::streamsize(bytes.size()));
        if (!out) throw std::invalid_argument("[save] path: cannot write '" + temporary + "'");
    }
    if (std::rename(temporary.c_str(), path.c_str()) != 0) {
        std::remove(temporary.c_str());
        throw std::invalid_argument("[save] path: cannot replace '" + path + "'");
    }
}

template <typename T>
Sequential<T> load(const std::string& path) {
    const std::string file = read_file(path);
    const auto entries = unzip(file);
    const JsonObject arch = architecture(entries);
    const std::string* dtype =
        std::get_if<std::string>(&field(arch, "dtype", "architecture").value);
    if (!dtype || *dtype != dtype_name<T>())
        refuse(std::string("dtype: expected ") + dtype_name<T>() + ", got " +
               (dtype ? *dtype : std::string("no string")));
    const JsonArray* layers = std::get_if<JsonArray>(&field(arch, "layers", "architecture").value);
    if (!layers) refuse("architecture: expected a list \"layers\"");
    Sequential<T> model;
    // the weights the architecture asks for must fit in the file before any is allocated
    int64_t budget = int64_t(file.size() / sizeof(T));
    auto reserve = [&](const std::string& where, int64_t a, int64_t b, int64_t c, int64_t d) {
        const int64_t limit = int64_t(1) << 40;
        if (a > limit || b > limit || c > limit || d > limit || a * b > budget ||
            a * b * c > budget || a * b * c * d > budget)
            refuse(where + ": expected weights that fit in the file, got larger sizes");
        budget -= a * b * c * d;
    };
    for (size_t i = 0; i < layers->size(); ++i) {
        const std::string where = "architecture: layer " + std::to_string(i);
        const JsonObject* spec = std::get_if<JsonObject>(&(*layers)[i].value);
        if (!spec) refuse(where + ": expected an object");
        const std::string* type = std::get_if<std::string>(&field(*spec, "type", where).value);
        if (!type) refuse(where + ": expected a string \"type\"");
        auto get_int = [&](const char* key) {
            return as_int(field(*spec, key, where), where + "." + key);
        };
        auto get_pair = [&](const char* key) {
            return as_pair(field(*spec, key, where), where + "." + key);
        };
        auto get_bool = [&](const char* key) {
            return as_bool(field(*spec, key, where), where + "." + key);
        };
        if (*type == "Conv2d") {
            const auto k = get_pair("kernel_size");
            reserve(where, get_int("out_channels"), get_int("in_channels"), k[0], k[1]);
        } else if (*type == "Linear") {
            reserve(where, get_int("out_features"), get_int("in_features"), 1, 1);
        }
        if (*type == "Conv2d")
            model.add(std::make_unique<Conv2d<T>>(get_int("in_channels"), get_int("out_channels"),
                                                  get_pair("kernel_size"), get_pair("stride"),
                                                  get_pair("padding"), get_bool("bias")));
        else if (*type == "Linear")
            model.add(std::make_unique<Linear<T>>(get_int("in_features"), get_int("out_features"),
                                                  get_bool("bias")));
        else if (*type == "MaxPool2d")
            model.add(std::make_unique<MaxPool2d<T>>(get_pair("kernel_size"), get_pair("stride"),
                                                     get_pair("padding")));
        else if (*type == "ReLU")
            model.add(std::make_unique<ReLU<T>>());
        else if (*type == "AvgPool2d")
            model.add(std::make_unique<AvgPool2d<T>>(get_pair("kernel_size"), get_pair("stride"),
                                                     get_pair("padding")));
        else if (*type == "Sigmoid")
            model.add(std::make_unique<Sigmoid<T>>());
        else if (*type == "Tanh")
            model.add(std::make_unique<Tanh<T>>());
        else if (*type == "Dropout")
            model.add(std::make_unique<Dropout<T>>(
                as_probability(field(*spec, "p", where), where + ".p")));
        else if (*type == "Flatten")
            model.add(std::make_unique<Flatten<T>>());
        else
            refuse(where + ": expected a known layer type, got \"" + *type + "\"");
    }
    size_t expected_entries = 1;
    for (auto& [name, p] : model.named_parameters()) {
        ++expected_entries;
        const auto it = entries.find(name + ".npy");
        if (it == entries.end()) refuse(name + ": expected an array, got none");
        const Npy npy = parse_npy(name, it->second.first, it->second.second);
        if (npy.descr != descr_of<T>())
            refuse(name + ": expected dtype " + dtype_name<T>() + ", got '" + npy.descr + "'");
        if (npy.shape != p->value.shape)
            refuse(name + ": expected shape " + shape_str(p->value.shape) + ", got shape " +
                   shape_str(npy.shape));
        std::memcpy(p->value.data.data(), npy.data, npy.bytes);
    }
    // an optimizer's state saved beside the model (Python's model.save(path, optimizer=...))
    // is not the model's: it is left to the loaders that ask for it
    for (const auto& entry : entries)
        if (entry.first.rfind("optimizer", 0) == 0) ++expected_entries;
    if (entries.size() != expected_entries)
        refuse("file: expected " + std::to_string(expected_entries) +
               " arrays (architecture and parameters), got " + std::to_string(entries.size()));
    return model;
}

template void save<float>(Sequential<float>&, const std::string&);
template void save<double>(Sequential<double>&, const std::string&);
template Sequential<float> load<float>(const std::string&);
template Sequential<double> load<double>(const std::string&);

}  // namespace cnnbp::nn
