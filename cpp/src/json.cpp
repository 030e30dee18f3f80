// JSON text <-> cnnbp::json::Value (see cnnbp/json.hpp).
#include "cnnbp/json.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "cnnbp/shapes.hpp"

namespace cnnbp::json {

namespace {

class Parser {
 public:
    Parser(const std::string& text, const std::string& where, int max_depth)
        : text_(text), where_(where), max_depth_(max_depth) {}

    Value document() {
        if (!valid_utf8()) fail("text that is not UTF-8");
        Value v = value(0);
        skip_space();
        if (pos_ != text_.size()) fail("trailing characters");
        return v;
    }

 private:
    const std::string& text_;
    const std::string& where_;
    const int max_depth_;
    size_t pos_ = 0;

    // RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF
    bool valid_utf8() {
        const auto* b = reinterpret_cast<const unsigned char*>(text_.data());
        const size_t n = text_.size();
        for (pos_ = 0; pos_ < n;) {
            const unsigned c = b[pos_];
            size_t len = c < 0x80         ? 1
                         : (c >> 5) == 6  ? 2
                         : (c >> 4) == 14 ? 3
                         : (c >> 3) == 30 ? 4
                                          : 0;
            if (!len || pos_ + len > n || (len == 2 && c < 0xC2) || (len == 4 && c > 0xF4))
                return false;
            for (size_t k = 1; k < len; ++k)
                if ((b[pos_ + k] & 0xC0) != 0x80) return false;
            if (len == 3 &&
                ((c == 0xE0 && b[pos_ + 1] < 0xA0) || (c == 0xED && b[pos_ + 1] >= 0xA0)))
                return false;
            if (len == 4 &&
                ((c == 0xF0 && b[pos_ + 1] < 0x90) || (c == 0xF4 && b[pos_ + 1] >= 0x90)))
                return false;
            pos_ += len;
        }
        pos_ = 0;
        return true;
    }
    [[noreturn]] void fail(const std::string& what) const {
        throw std::invalid_argument("[load] " + where_ + ": expected valid JSON, got " + what +
                                    " at character " + std::to_string(pos_));
    }
    void skip_space() {
        while (pos_ < text_.size() && std::strchr(" \t\r\n", text_[pos_]) && text_[pos_]) ++pos_;
    }
    bool consume(char c) {
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == c) return ++pos_, true;
        return false;
    }
    Value value(int depth) {
        if (depth > max_depth_) fail("nesting deeper than " + std::to_string(max_depth_));
        skip_space();
        if (pos_ >= text_.size()) fail("the end of the text");
        const char c = text_[pos_];
        if (c == '{') return object(depth);
        if (c == '[') return array(depth);
        if (c == '"') return string();
        for (const char* word : {"true", "false", "null"})
            if (text_.compare(pos_, std::strlen(word), word) == 0) {
                pos_ += std::strlen(word);
                if (word[0] == 'n') return nullptr;
                return word[0] == 't';
            }
        return number();
    }
    Value object(int depth) {
        ++pos_;
        Object out;
        if (consume('}')) return out;
        do {
            skip_space();
            std::string key = string();
            if (!consume(':')) fail("a missing ':'");
            Value v = value(depth + 1);
            if (find(out, key)) fail("the key \"" + key + "\" twice");
            out.emplace_back(std::move(key), std::move(v));
        } while (consume(','));
        if (!consume('}')) fail("a missing '}'");
        return out;
    }
    Value array(int depth) {
        ++pos_;
        Array out;
        if (consume(']')) return out;
        do out.push_back(value(depth + 1));
        while (consume(','));
        if (!consume(']')) fail("a missing ']'");
        return out;
    }
    // JSON's number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    Value number() {
        const size_t start = pos_;
        auto digits = [&] {
            const size_t from = pos_;
            while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
            return pos_ - from;
        };
        if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
        const size_t int_start = pos_;
        const size_t int_digits = digits();
        if (int_digits == 0) {
            const unsigned char c = static_cast<unsigned char>(text_[start]);
            char shown[16];
            std::snprintf(shown, sizeof shown, c >= 0x20 && c < 0x7F ? "'%c'" : "byte 0x%02x", c);
            fail(std::string("an unexpected character ") + shown);
        }
        if (int_digits > 1 && text_[int_start] == '0') fail("a number with a leading zero");
        bool integral = true;
        if (pos_ < text_.size() && text_[pos_] == '.') {
            ++pos_, integral = false;
            if (!digits()) fail("a malformed number");
        }
        if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
            ++pos_, integral = false;
            if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
            if (!digits()) fail("a malformed number");
        }
        const std::string token = text_.substr(start, pos_ - start);
        if (integral) {
            errno = 0;
            const long long i = std::strtoll(token.c_str(), nullptr, 10);
            if (errno == ERANGE) return Value::Big{token};
            return int64_t(i);
        }
        return std::strtod(token.c_str(), nullptr);  // overflow gives inf, refused by callers
    }
    std::string string() {
        if (pos_ >= text_.size() || text_[pos_] != '"') fail("a missing string");
        ++pos_;
        std::string out;
        while (pos_ < text_.size() && text_[pos_] != '"') {
            const char c = text_[pos_++];
            if (static_cast<unsigned char>(c) < 0x20) fail("a control character in a string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= text_.size()) break;
            const char e = text_[pos_++];
            const char* from = "\"\\/bfnrt";
            const char* to = "\"\\/\b\f\n\r\t";
            const char* hit = std::strchr(from, e);
            if (!hit || !*hit) fail("an unsupported escape");
            out += to[hit - from];
        }
        if (pos_ >= text_.size()) fail("an unterminated string");
        ++pos_;
        return out;
    }
};

void dump_string(std::string& out, const std::string& s) {
    out += '"';
    for (const char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\', out += c;
        } else if (static_cast<unsigned char>(c) < 0x20) {
            char buffer[8];
            std::snprintf(buffer, sizeof buffer, "\\u%04x", unsigned(c));
            out += buffer;
        } else {
            out += c;
        }
    }
    out += '"';
}

// a double as Python's json writes it: the shortest text that reads back the same (1.0,
// 0.25, 1e-05), NaN and Infinity spelled as Python spells them
std::string double_text(double d) {
    if (std::isnan(d)) return "NaN";
    if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
    return number_str(d);
}

void dump_into(std::string& out, const Value& value) {
    if (value.is_null()) {
        out += "null";
    } else if (const bool* b = value.get<bool>()) {
        out += *b ? "true" : "false";
    } else if (const int64_t* i = value.get<int64_t>()) {
        out += std::to_string(*i);
    } else if (const double* d = value.get<double>()) {
        out += double_text(*d);
    } else if (const std::string* s = value.get<std::string>()) {
        dump_string(out, *s);
    } else if (const Value::Big* big = value.get<Value::Big>()) {
        out += big->text;
    } else if (const Array* a = value.get<Array>()) {
        out += '[';
        for (size_t i = 0; i < a->size(); ++i) {
            if (i) out += ", ";
            dump_into(out, (*a)[i]);
        }
        out += ']';
    } else if (const Object* o = value.get<Object>()) {
        out += '{';
        for (size_t i = 0; i < o->size(); ++i) {
            if (i) out += ", ";
            dump_string(out, (*o)[i].first);
            out += ": ";
            dump_into(out, (*o)[i].second);
        }
        out += '}';
    }
}

}  // namespace

std::string printable(const std::string& text) {
    std::string out;
    for (const char c : text) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (u >= 0x20 && u < 0x7F) {
            out += c;
        } else {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\x%02x", u);
            out += escaped;
        }
    }
    return out;
}

const Value* find(const Object& object, const std::string& key) {
    for (const auto& [k, v] : object)
        if (k == key) return &v;
    return nullptr;
}

Value parse(const std::string& text, const std::string& where, int max_depth) {
    return Parser(text, where, max_depth).document();
}

std::string dump(const Value& value) {
    std::string out;
    dump_into(out, value);
    return out;
}

std::string describe(const Value& value) {
    if (value.is_null()) return "None";
    if (const bool* b = value.get<bool>()) return *b ? "True" : "False";
    if (const std::string* s = value.get<std::string>()) {
        return "'" + printable(s->substr(0, 60)) + (s->size() > 60 ? "..." : "") + "'";
    }
    if (value.get<Array>() || value.get<Object>()) {
        std::string text = dump(value);
        if (text.size() > 80) text = text.substr(0, 77) + "...";
        return text;
    }
    if (const double* d = value.get<double>()) {
        if (std::isnan(*d)) return "nan";
        if (std::isinf(*d)) return *d > 0 ? "inf" : "-inf";
    }
    std::string text = dump(value);
    if (text.size() > 40)
        text = text.substr(0, 20) + "... (" + std::to_string(text.size()) + " digits)";
    return text;
}

}  // namespace cnnbp::json
