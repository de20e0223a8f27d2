// SPDX-License-Identifier: Apache-2.0
// A reader for JSON texts in exactly the compact form keywarden writes (no spaces, members in
// the written order, strings of printable ASCII without escapes). The hot paths (ring files,
// manifest members, bundle metadata) try it first and fall back to the JSON library whenever
// it says no, so it must never accept a text the library would read differently or refuse.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace keywarden {

class StrictJson {
public:
    explicit StrictJson(std::string_view text) : m_t(text) {}
    // Consumes s if the text continues with it.
    bool lit(std::string_view s) {
        if (m_t.substr(m_p, s.size()) != s) return false;
        m_p += s.size();
        return true;
    }
    bool null() { return lit("null"); }
    bool peek(char c) const { return m_p < m_t.size() && m_t[m_p] == c; }
    // A string of printable ASCII without escapes (anything else: nullopt).
    std::optional<std::string_view> str() {
        if (!lit("\"")) return std::nullopt;
        std::size_t start = m_p;
        while (m_p < m_t.size()) {
            auto c = static_cast<unsigned char>(m_t[m_p]);
            if (c == '"') return m_t.substr(start, m_p++ - start);
            if (c == '\\' || c < 0x20 || c >= 0x7f) return std::nullopt;
            ++m_p;
        }
        return std::nullopt;
    }
    // An integer that fits T, without leading zeros; "-0", fractions and exponents: nullopt.
    template <typename T>
    std::optional<T> num() {
        std::size_t start = m_p, p = m_p;
        if (p < m_t.size() && m_t[p] == '-') ++p;
        std::size_t digits = p;
        while (p < m_t.size() && m_t[p] >= '0' && m_t[p] <= '9') ++p;
        std::size_t nd = p - digits;
        if (nd == 0 || nd > 19 || (m_t[digits] == '0' && (nd > 1 || digits != start))) return std::nullopt;
        if (p < m_t.size() && (m_t[p] == '.' || m_t[p] == 'e' || m_t[p] == 'E')) return std::nullopt;
        T v{};
        auto [end, ec] = std::from_chars(m_t.data() + start, m_t.data() + p, v);
        if (ec != std::errc() || end != m_t.data() + p) return std::nullopt;
        m_p = p;
        return v;
    }
    // null (out empty) or a value of that kind (out set); false when it is neither.
    template <typename T>
    bool null_or_num(std::optional<T>& out) {
        out.reset();
        if (null()) return true;
        out = num<T>();
        return out.has_value();
    }
    bool null_or_str(std::optional<std::string_view>& out) {
        out.reset();
        if (null()) return true;
        out = str();
        return out.has_value();
    }
    std::optional<bool> boolean() {
        if (lit("true")) return true;
        if (lit("false")) return false;
        return std::nullopt;
    }
    bool at_end() const { return m_p == m_t.size(); }

private:
    std::string_view m_t;
    std::size_t m_p = 0;
};

// Appends v as a JSON string when it is printable ASCII without '"' or '\\': then every JSON
// writer writes the same bytes. False, and nothing appended, otherwise (use the JSON library).
inline bool append_plain_json_string(std::string& out, std::string_view v) {
    for (char ch : v) {
        auto c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x7f) return false;
    }
    out += '"';
    out += v;
    out += '"';
    return true;
}

// Appends v as a JSON string, byte for byte as the JSON library's dump() writes it: plain text
// directly (append_plain_json_string), anything else through the library.
void append_json_string(std::string& out, std::string_view v);

}  // namespace keywarden
