// SPDX-License-Identifier: Apache-2.0
#include "keywarden/encoding.hpp"

#include <openssl/evp.h>

namespace keywarden {

std::string to_hex(std::span<const std::uint8_t> b) {
    static const char* d = "0123456789abcdef";
    std::string s;
    s.reserve(b.size() * 2);
    for (auto c : b) {
        s.push_back(d[c >> 4]);
        s.push_back(d[c & 15]);
    }
    return s;
}

std::optional<std::vector<std::uint8_t>> from_hex(std::string_view s) {
    if (s.size() % 2) return std::nullopt;
    auto val = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::vector<std::uint8_t> out(s.size() / 2);
    for (std::size_t i = 0; i < out.size(); ++i) {
        int hi = val(s[2 * i]), lo = val(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return std::nullopt;
        out[i] = static_cast<std::uint8_t>(hi << 4 | lo);
    }
    return out;
}

namespace {
template <typename Out>
void encode(std::span<const std::uint8_t> b, Out& out) {
    out.resize(4 * ((b.size() + 2) / 3) + 1);
    int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), b.data(),
                            static_cast<int>(b.size()));
    out.resize(static_cast<std::size_t>(n));
}

template <typename Out>
bool decode(std::string_view s, Out& out) {
    if (s.size() % 4 != 0) return false;
    for (std::size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '+' || c == '/' || (c == '=' && i >= s.size() - 2);
        if (!ok) return false;
    }
    if (s.size() >= 2 && s[s.size() - 2] == '=' && s.back() != '=') return false;
    out.resize(s.size() / 4 * 3);
    int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(s.data()),
                            static_cast<int>(s.size()));
    if (n < 0) return false;
    std::size_t pad = 0;
    if (!s.empty() && s.back() == '=') ++pad;
    if (s.size() >= 2 && s[s.size() - 2] == '=') ++pad;
    out.resize(static_cast<std::size_t>(n) - pad);
    return true;
}
}  // namespace

std::string to_base64(std::span<const std::uint8_t> b) {
    std::string out;
    encode(b, out);
    return out;
}

std::optional<std::vector<std::uint8_t>> from_base64(std::string_view s) {
    std::vector<std::uint8_t> out;
    if (!decode(s, out)) return std::nullopt;
    return out;
}

SecureBytes base64_secret(std::span<const std::uint8_t> b) {
    SecureBytes out;
    encode(b, out);
    return out;
}

std::optional<SecureBytes> secret_from_base64(std::string_view s) {
    SecureBytes out;
    if (!decode(s, out)) return std::nullopt;
    return out;
}

void put_u16(std::vector<std::uint8_t>& o, std::uint16_t v) {
    o.push_back(static_cast<std::uint8_t>(v >> 8));
    o.push_back(static_cast<std::uint8_t>(v));
}
void put_u32(std::vector<std::uint8_t>& o, std::uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) o.push_back(static_cast<std::uint8_t>(v >> s));
}
void put_u64(std::vector<std::uint8_t>& o, std::uint64_t v) {
    for (int s = 56; s >= 0; s -= 8) o.push_back(static_cast<std::uint8_t>(v >> s));
}
std::uint16_t get_u16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] << 8 | p[1]); }
std::uint32_t get_u32(const std::uint8_t* p) {
    return static_cast<std::uint32_t>(p[0]) << 24 | static_cast<std::uint32_t>(p[1]) << 16 |
           static_cast<std::uint32_t>(p[2]) << 8 | p[3];
}
std::uint64_t get_u64(const std::uint8_t* p) {
    return static_cast<std::uint64_t>(get_u32(p)) << 32 | get_u32(p + 4);
}

}  // namespace keywarden
