// .npz archives as model files use them: a zip of stored (uncompressed) .npy entries, as
// NumPy's np.savez writes them. Reading checks every entry against the file before any of
// its data is used: a header or a zip directory that declares more than the file holds is
// refused, never allocated. Errors are std::invalid_argument "[load] ...".
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "cnnbp/shapes.hpp"

namespace cnnbp::npz {

// One .npy entry, pointing into the archive's bytes.
struct Array {
    std::string descr;  // NumPy's dtype string: "<f4", "<f8", "|u1", ...
    std::string dtype;  // its name as NumPy prints it: "float32", "uint8", ">f4", "object"
    Shape shape;
    const unsigned char* data = nullptr;
    size_t bytes = 0;
};

// name (without ".npy") -> array, for every entry of the archive `file` (its bytes).
std::map<std::string, Array> read(const std::string& file);

// The bytes of a file or "[load] file: expected a .npz model file, got ..." when it cannot
// be read.
std::string read_file(const std::string& path);

// A .npy entry to write: a plain little-endian array in C order.
struct Entry {
    std::string name;   // without ".npy"
    std::string descr;  // "<f4", "<f8", "|u1", "<i8"
    Shape shape;
    const void* data;
    size_t bytes;
};

// Writes the archive to a temporary file beside `path` and renames it over `path`, so a
// failed save leaves the old file. Throws std::invalid_argument "[save] ...".
void write(const std::string& path, const std::vector<Entry>& entries);

}  // namespace cnnbp::npz
