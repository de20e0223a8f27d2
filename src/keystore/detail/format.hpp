// SPDX-License-Identifier: Apache-2.0
// Pure format code for key store files: no I/O, no token. Parsers take bytes and return values.
#pragma once

#include <nlohmann/json.hpp>
#include <span>

#include "keywarden/keystore.hpp"

namespace keywarden::keystore::detail {

// Every signed file is: magic (8) | format u16be | body length u32be | body (JSON) | MAC (32).
constexpr std::size_t kHeaderSize = 14;
constexpr std::size_t kMacSize = 32;
constexpr const char kRingMagic[9] = "KWKEYRNG";
constexpr const char kManifestMagic[9] = "KWMANIFS";
constexpr std::uint16_t kRingFormat = 1;
constexpr std::uint16_t kManifestFormat = 1;

// The bytes the MAC covers: domain || 0x00 || binding || 0x00 || file bytes before the MAC.
Bytes mac_input(std::string_view domain, std::string_view binding,
                std::span<const std::uint8_t> signed_part);

// The same input as parts, for MacKey::mac_parts (no copy of a large file).
MacKey::Parts mac_parts_of(std::string_view domain, std::string_view binding,
                           std::span<const std::uint8_t> signed_part);

// Frames a body; the MAC is appended by the caller (it comes from the token).
Bytes frame(const char* magic, std::uint16_t format, const std::string& body);
// Checks size, magic and format, and returns the signed part's length. Throws FormatError /
// IntegrityError. Does not look at the body.
std::size_t check_frame(std::span<const std::uint8_t> file, const char* magic,
                        std::uint16_t format, const std::string& what);
// The body after the MAC has verified.
nlohmann::json parse_body(std::span<const std::uint8_t> file, const std::string& what);

nlohmann::json ring_to_json(const KeyRing& r, const std::string& store_id);
KeyRing ring_from_json(const nlohmann::json& j, const std::string& store_id);

struct ManifestEntry {
    std::string file;
    std::string sha256;  // hex of the ring file's bytes
    RingSummary summary;
};
struct ManifestData {
    std::string store_id;
    std::uint64_t generation = 0;
    std::string meta_sha256;  // hex of store.json's bytes
    std::map<std::string, ManifestEntry> rings;  // by key id
};
// The manifest body is written and read without building a JSON tree of it: with 100,000 rings
// a tree would cost hundreds of MiB. Same JSON as a tree's dump(): compact, keys sorted.
std::string manifest_body(const ManifestData& m);
// Parses an authenticated manifest body (the frame already checked).
ManifestData parse_manifest_body(std::span<const std::uint8_t> file);
RingSummary summarize(const KeyRing& r);
bool same_summary(const RingSummary& a, const RingSummary& b);

nlohmann::json meta_to_json(const StoreMeta& m);
// Completes a new store's metadata (in keystore.cpp, for both store versions): a random store
// id and the creation time unless given, the key protection method, the master keys' check
// values.
void complete_new_meta(StoreMeta& meta, MasterKeys& keys);
StoreMeta meta_from_json(const nlohmann::json& j);

}  // namespace keywarden::keystore::detail
