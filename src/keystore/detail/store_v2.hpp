// SPDX-License-Identifier: Apache-2.0
// What the v2 key store's source files share (keystore.cpp: init, open, read, verify;
// keystore_write.cpp: generate, destroy, staging, bulk writing). Private to the library.
#pragma once

#include <map>
#include <optional>
#include <utility>
#include <set>
#include <span>
#include <string>
#include <string_view>

#include "format.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"
#include "util/bytes.hpp"

namespace keywarden::keystore::detail {

inline constexpr std::string_view kRingDomain = "keywarden-keyring-v1";
inline constexpr std::string_view kManifestDomain = "keywarden-manifest-v1";
inline constexpr const char* kPending = ".pending";
inline constexpr const char* kVersion2Text = "keywarden-keystore 2\n";

inline std::string hex_digest(std::span<const std::uint8_t> b) { return to_hex(sha256(b)); }


inline std::string ring_binding(const std::string& store_id, const KeyId& id) {
    return store_id + "/" + id.str();
}

inline IntegrityError mac_mismatch(const std::string& what) {
    return IntegrityError(what + " does not verify (MAC mismatch)",
                          "the file was changed, copied from elsewhere, or the master "
                          "signature key is not the one that signed it");
}

// A signed file: MAC verified before a single byte of the body is parsed.
inline void verify_signed(MacKey& mac, std::span<const std::uint8_t> file, const char* magic,
                   std::uint16_t format, std::string_view domain, const std::string& binding,
                   const std::string& what) {
    std::size_t n = check_frame(file, magic, format, what);
    auto signed_part = file.first(n);
    auto tag = file.subspan(n);
    if (!mac.verify_parts(mac_parts_of(domain, binding, signed_part), tag)) throw mac_mismatch(what);
}

inline Bytes seal(MacKey& mac, const char* magic, std::uint16_t format, std::string_view domain,
           const std::string& binding, const std::string& body) {
    Bytes file = frame(magic, format, body);
    auto tag = mac.mac_parts(mac_parts_of(domain, binding, file));
    file.insert(file.end(), tag.begin(), tag.end());
    return file;
}


// A manifest member's name (its key id) and where the JSON string that holds it ends; nullopt if
// the text does not start with a whole JSON string (keystore.cpp).
std::optional<std::pair<std::string, std::size_t>> member_name(std::string_view text);

}  // namespace keywarden::keystore::detail

namespace keywarden::keystore {



struct KeyStore::Manifest {
    detail::ManifestData data;
    std::set<std::string> pending;  // rings whose current bytes are in "<file>.pending"
};

struct KeyStore::Streamed {
    Bytes sha256;  // of the manifest file whose MAC verified at open
    std::map<RingKind, KeyStore::Counts> counts;
};

}  // namespace keywarden::keystore
