// SPDX-License-Identifier: Apache-2.0
// Hex and base64 for formats and output.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keywarden/secure_buffer.hpp"

namespace keywarden {

std::string to_hex(std::span<const std::uint8_t> b);
// nullopt on odd length or a non-hex character.
std::optional<std::vector<std::uint8_t>> from_hex(std::string_view s);
std::string to_base64(std::span<const std::uint8_t> b);
// Standard alphabet with padding; nullopt on anything else.
std::optional<std::vector<std::uint8_t>> from_base64(std::string_view s);
// For secrets: the output lives in a wiping buffer.
SecureBytes base64_secret(std::span<const std::uint8_t> b);
std::optional<SecureBytes> secret_from_base64(std::string_view s);

// Big-endian integers in binary formats.
void put_u16(std::vector<std::uint8_t>& out, std::uint16_t v);
void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v);
void put_u64(std::vector<std::uint8_t>& out, std::uint64_t v);
std::uint16_t get_u16(const std::uint8_t* p);
std::uint32_t get_u32(const std::uint8_t* p);
std::uint64_t get_u64(const std::uint8_t* p);

}  // namespace keywarden
