// SPDX-License-Identifier: Apache-2.0
// Format code for key store files: parsers take bytes and return values. The one exception, the
// manifest scanner, reads through a Storage::Reader and a MacKey::Stream it is given.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>

#include "keywarden/keystore.hpp"
#include "keywarden/storage.hpp"

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
// The 14-byte header alone: magic, format, body length (for a body written in pieces).
Bytes frame_header(const char* magic, std::uint16_t format, std::uint32_t body_length);
// Checks the magic and format of a 14-byte header; returns the body length it states.
std::uint32_t check_header(const std::uint8_t* header, const char* magic, std::uint16_t format,
                           const std::string& what);
// Checks size, magic and format, and returns the signed part's length. Throws FormatError /
// IntegrityError. Does not look at the body.
std::size_t check_frame(std::span<const std::uint8_t> file, const char* magic,
                        std::uint16_t format, const std::string& what);
// The body after the MAC has verified.
nlohmann::json parse_body(std::span<const std::uint8_t> file, const std::string& what);

nlohmann::json ring_to_json(const KeyRing& r, const std::string& store_id);
// ring_to_json(r, store_id).dump(), byte for byte, without building the tree.
std::string ring_body(const KeyRing& r, const std::string& store_id);
KeyRing ring_from_json(const nlohmann::json& j, const std::string& store_id);
// The ring body in exactly ring_body's form, read without a JSON tree; nullopt for anything else
// (another layout, or a value ring_from_json refuses), which is then left to ring_from_json.
std::optional<KeyRing> ring_from_text(std::string_view body, const std::string& store_id);
// The ring in a framed file (check_frame done): ring_from_text, else the JSON parser.
KeyRing ring_from_body(std::span<const std::uint8_t> file, const std::string& store_id, const std::string& what);

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
// The body in three pieces, for writing it without building it: everything before the first
// member of "rings", one member ("<key id>":{...}; members are joined by ','), everything after.
std::string manifest_prefix(const ManifestData& m);
std::string manifest_member(const std::string& id, const ManifestEntry& e);
// A member's value (the text after "<key id>":) in exactly manifest_member's form, without a
// JSON tree; nullopt for anything else, which is left to the JSON parser.
std::optional<ManifestEntry> entry_from_text(const std::string& id, std::string_view text);
std::string manifest_suffix(const ManifestData& m);
// Parses an authenticated manifest body (the frame already checked).
ManifestData parse_manifest_body(std::span<const std::uint8_t> file);
// Reads a signed manifest file in pieces, without holding it, for stores too large to load
// (export of 100,000 rings). It checks the framing as it goes, feeds the signed part to `mac`
// (when given) and the whole file to a SHA-256, and yields the ring entries one at a time,
// parsed and checked as parse_manifest_body does. The rings must be in strictly increasing key
// id order, as every writer writes them (section 9 of docs/keystore-format.md), so no ring can
// appear twice. Nothing yielded is authenticated before the end: the caller checks tag() (or
// compares sha256() with an authenticated digest) before anything it did is kept.
class ManifestScanner {
public:
    // in_memory: the file is already held whole (a loaded store): no limit on a member's size
    // (a ring rotated a hundred thousand times has a member of more than 16 MiB) and no SHA-256
    // (sha256() stays empty).
    ManifestScanner(std::unique_ptr<Storage::Reader> in, MacKey::Stream* mac, std::string_view domain,
                    const std::string& binding, bool in_memory = false);
    ~ManifestScanner();
    // The next ring, or nullopt after the last one; then the whole file has been read, the
    // top-level fields are in top() and tag() and sha256() are ready.
    std::optional<std::pair<std::string, ManifestEntry>> next();
    // The next ring's key id only, its value passed over unparsed (for a reader that skips rings
    // it does not want: the whole file still goes through the hash, and a reader compares it
    // with the authenticated one at the end).
    std::optional<std::string> skip_next();
    const ManifestData& top() const { return m_top; }  // store_id, generation, meta_sha256
    // After next() threw: reads the rest of the file into the MAC (and the hash) and takes the
    // tag from where the header says it is, so that the caller can tell a damaged file (MAC
    // mismatch) from a body keywarden wrote wrongly. False if the file's length is wrong.
    bool drain();
    const Bytes& tag() const { return m_tag; }
    Bytes sha256() const { return m_sha; }

private:
    std::optional<std::pair<std::string, ManifestEntry>> read_next(bool parse_entry);
    std::size_t fill();
    void feed_mac();
    static constexpr std::size_t kMaxValue = 16u << 20;
    int peek();
    int get();
    void expect(char c);
    void skip_ws();
    std::string value_text();
    std::string key();
    void top_member(const std::string& name);
    void finish();

    std::unique_ptr<Storage::Reader> m_in;
    MacKey::Stream* m_mac;
    struct Hash;
    std::unique_ptr<Hash> m_hash;
    std::vector<std::uint8_t> m_buf;
    std::size_t m_pos = 0, m_len = 0;
    std::uint64_t m_file_off = 0;    // file offset of m_buf[0]
    std::uint64_t m_signed_end = 0;  // header + body length
    std::uint64_t m_mac_done = 0;    // file offset up to which the MAC has been fed
    int m_state = 0;                 // 0 before rings, 1 in rings, 2 done
    bool m_in_memory = false;
    unsigned m_seen = 0;             // top-level fields seen, a bit each (kTopFields in format.cpp)
    std::string m_last_id;
    ManifestData m_top;
    Bytes m_tag, m_sha;
};

RingSummary summarize(const KeyRing& r);
bool same_summary(const RingSummary& a, const RingSummary& b);

nlohmann::json meta_to_json(const StoreMeta& m);
// Completes a new store's metadata (in keystore.cpp, for both store versions): a random store
// id and the creation time unless given, the key protection method, the master keys' check
// values.
void complete_new_meta(StoreMeta& meta, MasterKeys& keys);
// Throws ConflictError when store.json or the version file exists (init, under the store lock).
void refuse_if_store_appeared(const Storage& storage);
StoreMeta meta_from_json(const nlohmann::json& j);

}  // namespace keywarden::keystore::detail
