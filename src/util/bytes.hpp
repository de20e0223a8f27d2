// SPDX-License-Identifier: Apache-2.0
// Small byte helpers shared by the library's files. Private to the library.
#pragma once

#include <openssl/crypto.h>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keywarden/secure_buffer.hpp"

namespace keywarden::util {

// Equal sizes and equal bytes, compared in constant time (MACs, check values, key values).
inline bool same_bytes(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
    return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

inline std::vector<std::uint8_t> to_bytes(std::string_view s) { return {s.begin(), s.end()}; }

inline void append(SecureBytes& out, std::string_view s) { out.insert(out.end(), s.begin(), s.end()); }

}  // namespace keywarden::util
