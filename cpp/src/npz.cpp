// Reading and writing .npz archives of .npy arrays (see npz.hpp).
#include "npz.hpp"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "cnnbp/errors.hpp"
#include "cnnbp/json.hpp"

namespace cnnbp::npz {

namespace {

[[noreturn]] void refuse(const std::string& what) { throw std::invalid_argument("[load] " + what); }

uint64_t get(const unsigned char* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
    return v;
}

void put(std::string& out, uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) out += char((value >> (8 * i)) & 0xff);
}

uint32_t crc32(const unsigned char* bytes, size_t size) {
    static const auto table = [] {
        std::vector<uint32_t> t(256);
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < size; ++i) crc = table[(crc ^ bytes[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

// NumPy's name of a plain dtype string, and its item size (0: not a plain numeric dtype)
std::pair<std::string, size_t> dtype_of(const std::string& descr) {
    if (descr.size() >= 3 && std::strchr("<>|=", descr[0])) {
        const char kind = descr[1];
        const std::string digits = descr.substr(2);
        if (digits.find_first_not_of("0123456789") == std::string::npos && digits.size() <= 2) {
            const size_t size = size_t(std::stoul(digits));
            const bool native = descr[0] != '>' || size == 1;
            const char* names = nullptr;
            if (kind == 'f') names = "float";
            if (kind == 'i') names = "int";
            if (kind == 'u') names = "uint";
            if (kind == 'b' && size == 1) return {"bool", 1};
            if (names && (size == 1 || size == 2 || size == 4 || size == 8) &&
                !(kind == 'f' && size == 1))
                return {native ? names + std::to_string(8 * size) : descr, size};
        }
    }
    if (descr == "|O" || descr == "<O" || descr == ">O") return {"object", 0};
    return {descr, 0};
}

// A .npy held in `bytes`: its header checked against the bytes that follow it.
Array parse_npy(const std::string& name, const unsigned char* bytes, size_t size) {
    const std::string where = name + ".npy";
    auto bad_header = [&](const std::string& what) {
        refuse(where + ": expected a .npy header of version 1.0 or 2.0, got " + what);
    };
    if (size < 10 || std::memcmp(bytes, "\x93NUMPY", 6) != 0) bad_header("other bytes");
    const unsigned major = bytes[6], minor = bytes[7];
    size_t header_len, offset;
    if (major == 1 && minor == 0) {
        header_len = size_t(get(bytes + 8, 2)), offset = 10;
    } else if (major == 2 && minor == 0) {
        if (size < 12) bad_header("a truncated header");
        header_len = size_t(get(bytes + 8, 4)), offset = 12;
    } else {
        bad_header("version " + std::to_string(major) + "." + std::to_string(minor));
    }
    if (header_len > size - offset) bad_header("a truncated header");
    const std::string header(reinterpret_cast<const char*>(bytes + offset), header_len);
    // {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
    auto after = [&](const std::string& key) {
        const size_t at = header.find("'" + key + "':");
        if (at == std::string::npos) bad_header("a header without '" + key + "'");
        size_t p = at + key.size() + 3;
        while (p < header.size() && header[p] == ' ') ++p;
        return p;
    };
    Array out;
    size_t p = after("descr");
    if (p >= header.size() || header[p] != '\'') {
        // a structured dtype ([('a', '<f4'), ...]) is not a plain array
        const size_t end = header.find("'fortran_order'");
        out.dtype = header.substr(p, end == std::string::npos ? 20 : std::min<size_t>(end - p, 60));
        while (!out.dtype.empty() && (out.dtype.back() == ' ' || out.dtype.back() == ','))
            out.dtype.pop_back();
        refuse(where + ": expected a numeric array, got dtype " + out.dtype);
    }
    const size_t end = header.find('\'', p + 1);
    if (end == std::string::npos) bad_header("a malformed descr");
    out.descr = header.substr(p + 1, end - p - 1);
    size_t item_size;
    std::tie(out.dtype, item_size) = dtype_of(out.descr);
    if (!item_size) refuse(where + ": expected a numeric array, got dtype " + out.dtype);
    p = after("fortran_order");
    if (header.compare(p, 5, "False") != 0) refuse(where + ": expected C order, got Fortran order");
    p = after("shape");
    if (p >= header.size() || header[p] != '(') bad_header("a malformed shape");
    const size_t close = header.find(')', p);
    if (close == std::string::npos) bad_header("a malformed shape");
    std::stringstream dims(header.substr(p + 1, close - p - 1));
    std::string dim;
    while (std::getline(dims, dim, ',')) {
        const size_t first = dim.find_first_not_of(' ');
        if (first == std::string::npos) continue;
        const size_t last = dim.find_last_not_of(' ');
        dim = dim.substr(first, last - first + 1);
        if (dim.find_first_not_of("0123456789") != std::string::npos || dim.size() > 18)
            bad_header("a malformed shape");
        out.shape.push_back(std::stoll(dim));
    }
    const int64_t count = checked_numel("load", (where + ": shape").c_str(), out.shape);
    out.data = bytes + offset + header_len;
    out.bytes = size - offset - header_len;
    const uint64_t declared = uint64_t(count) * item_size;
    if (out.bytes != declared)
        refuse(where + ": expected " + std::to_string(declared) +
               " bytes of data as its header declares (shape " + shape_str(out.shape) + ", " +
               out.dtype + "), got " + std::to_string(out.bytes));
    return out;
}

std::string npy_bytes(const Entry& e) {
    std::string dims;
    for (int64_t d : e.shape) dims += std::to_string(d) + ", ";
    if (e.shape.size() > 1) dims.erase(dims.size() - 2);
    if (e.shape.size() == 1) dims.pop_back();
    std::string header =
        "{'descr': '" + e.descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    // pad so the data starts on a 64-byte boundary, as NumPy writes it
    const size_t total = (10 + header.size() + 1 + 63) / 64 * 64;
    header.append(total - 10 - header.size() - 1, ' ');
    header += '\n';
    std::string out("\x93NUMPY\x01\x00", 8);
    put(out, header.size(), 2);
    out += header;
    out.append(static_cast<const char*>(e.data), e.bytes);
    return out;
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

}  // namespace

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        refuse("file: expected a .npz model file, got a path that cannot be read: '" + path +
               "' (" + std::strerror(errno) + ")");
    std::ostringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

std::map<std::string, Array> read(const std::string& file) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(file.data());
    const size_t size = file.size();
    const std::string not_npz = "file: expected a .npz model file, got ";
    if (size < 22) refuse(not_npz + std::to_string(size) + " bytes");
    size_t eocd = std::string::npos;
    for (size_t i = size - 22 + 1; i-- > 0 && size - i <= 22 + 0xFFFF;)
        if (get(bytes + i, 4) == 0x06054b50) {
            eocd = i;
            break;
        }
    if (eocd == std::string::npos) refuse(not_npz + "no zip directory (truncated?)");
    const uint64_t count = get(bytes + eocd + 10, 2);
    const uint64_t dir_size = get(bytes + eocd + 12, 4), dir_offset = get(bytes + eocd + 16, 4);
    if (dir_offset > eocd || dir_size > eocd - dir_offset)
        refuse(not_npz + "a corrupt zip directory");
    std::map<std::string, Array> out;
    size_t p = dir_offset;
    for (uint64_t e = 0; e < count; ++e) {
        if (p + 46 > dir_offset + dir_size || get(bytes + p, 4) != 0x02014b50)
            refuse(not_npz + "a corrupt zip directory");
        const uint64_t flags = get(bytes + p + 8, 2), method = get(bytes + p + 10, 2);
        const uint64_t crc = get(bytes + p + 16, 4);
        uint64_t compressed = get(bytes + p + 20, 4), uncompressed = get(bytes + p + 24, 4);
        const uint64_t name_len = get(bytes + p + 28, 2), extra_len = get(bytes + p + 30, 2),
                       comment_len = get(bytes + p + 32, 2);
        uint64_t local = get(bytes + p + 42, 4);
        if (p + 46 + name_len + extra_len + comment_len > dir_offset + dir_size)
            refuse(not_npz + "a corrupt zip directory");
        const std::string name =
            json::printable(std::string(reinterpret_cast<const char*>(bytes + p + 46), name_len));
        // zip64: the sizes and offset that overflowed 32 bits follow in extra field 0x0001
        const size_t extra_end = p + 46 + name_len + extra_len;
        for (size_t x = p + 46 + name_len; x + 4 <= extra_end;) {
            const uint64_t id = get(bytes + x, 2), len = get(bytes + x + 2, 2);
            if (x + 4 + len > extra_end) refuse(name + ": expected a zip entry, got a corrupt one");
            size_t y = x + 4;
            if (id == 1) {
                for (uint64_t* v : {&uncompressed, &compressed, &local})
                    if (*v == 0xFFFFFFFFu && y + 8 <= x + 4 + len) *v = get(bytes + y, 8), y += 8;
            }
            x += 4 + len;
        }
        if (method != 0 || (flags & 1))
            refuse(name + ": expected an uncompressed, unencrypted entry, got method " +
                   std::to_string(method));
        if (compressed != uncompressed || uncompressed > size)
            refuse(name + ": expected an entry within the file's " + std::to_string(size) +
                   " bytes, got a declared size of " + std::to_string(uncompressed));
        if (name.size() < 4 || name.compare(name.size() - 4, 4, ".npy") != 0)
            refuse(name + ": expected only .npy entries");
        if (local + 30 > size || get(bytes + local, 4) != 0x04034b50)
            refuse(not_npz + "a corrupt zip entry " + name);
        const uint64_t start = local + 30 + get(bytes + local + 26, 2) + get(bytes + local + 28, 2);
        if (start > size || compressed > size - start)
            refuse(name + ": expected an entry within the file's " + std::to_string(size) +
                   " bytes, got one that runs past its end (truncated?)");
        if (crc32(bytes + start, size_t(compressed)) != crc)
            refuse(name + ": expected its checksum, got other data (the file is damaged)");
        const std::string key = name.substr(0, name.size() - 4);
        Array array = parse_npy(key, bytes + start, size_t(compressed));
        if (!out.emplace(key, std::move(array)).second)
            refuse(name + ": expected one entry of each name, got it twice");
        p += 46 + name_len + extra_len + comment_len;
    }
    return out;
}

void write(const std::string& path, const std::vector<Entry>& entries) {
    std::vector<std::pair<std::string, std::string>> files;
    for (const Entry& e : entries) files.emplace_back(e.name + ".npy", npy_bytes(e));
    const std::string bytes = zip(files);
    const std::string temporary = path + ".tmp";
    // A new file, so that it gets the mode a plain open() gives (0666 less the umask):
    // truncating a temporary left over by a failed save would keep that file's mode.
    std::remove(temporary.c_str());
    {
        std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
        if (out) out.write(bytes.data(), std::streamsize(bytes.size()));
        if (out) out.flush();
        if (!out) {
            const std::string reason = std::strerror(errno);
            out.close();
            std::remove(temporary.c_str());
            throw io_error("[save] path: cannot write '" + temporary + "' (" + reason + ")");
        }
    }
    if (std::rename(temporary.c_str(), path.c_str()) != 0) {
        const std::string reason = std::strerror(errno);
        std::remove(temporary.c_str());
        throw io_error("[save] path: cannot replace '" + path + "' (" + reason + ")");
    }
}

}  // namespace cnnbp::npz
