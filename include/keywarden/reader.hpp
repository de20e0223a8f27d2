// SPDX-License-Identifier: Apache-2.0
// What an application needs to fetch its keys from a keywarden store: open the store read-only on
// its token, list the key ids, read a key. Everything else (writing, backups, token checks) is
// the keywarden command's. The public headers are this one, token_options.hpp, error.hpp,
// secure_buffer.hpp, encoding.hpp and the generated version.hpp.
//
//   keywarden::init_secure_heap();
//   auto store = keywarden::StoreReader::open("/var/lib/app/keystore", {});
//   keywarden::SecureBytes key = store.read_secret("client/alice01/symmetric");
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "keywarden/error.hpp"
#include "keywarden/secure_buffer.hpp"
#include "keywarden/token_options.hpp"

namespace keywarden {

class StoreReader {
public:
    // Opens the store (v1 or v2) at `path` read-only: reads its metadata, selects its token (the
    // one the metadata names, unless token.token names another), logs in, finds the master keys
    // and authenticates the store's manifest. Throws keywarden::Error (exit_code() says which kind:
    // 3 for the token or PIN, 4 for a store that does not verify).
    static StoreReader open(const std::string& path, const TokenOptions& token);

    StoreReader(StoreReader&&) noexcept;
    StoreReader& operator=(StoreReader&&) noexcept;
    ~StoreReader();

    // 1 or 2.
    int store_version() const;
    // Every key id in the store, e.g. "client/alice01/symmetric", "poison/keypair", "audit/log".
    std::vector<std::string> key_ids() const;
    // A symmetric or HMAC key, or the private half of a keypair, of the current version or of
    // `version`: the bytes `keywarden read --private --format raw` prints. They live in the
    // locked, wiping heap.
    SecureBytes read_secret(const std::string& key_id, std::optional<std::uint32_t> version = {}) const;
    // The public half of a keypair, current version or `version`: the bytes `keywarden read
    // --public --format raw` prints. Throws UsageError for a symmetric or HMAC key.
    std::vector<std::uint8_t> read_public(const std::string& key_id,
                                          std::optional<std::uint32_t> version = {}) const;

private:
    struct Impl;
    explicit StoreReader(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> m_impl;
};

}  // namespace keywarden
