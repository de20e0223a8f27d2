// SPDX-License-Identifier: Apache-2.0
// How an application fetches a key from a keywarden store, through the public C++ API.
//
//   fetch_key KEYSTORE KEY-ID
//
// The token is found from the store's own metadata; the module and PIN come from the
// environment as for the CLI (KEYWARDEN_MODULE, KEYWARDEN_PIN or KEYWARDEN_PIN_SOURCE). The
// example prints the key's length and check value, never the key itself.
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/open_store.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: fetch_key KEYSTORE KEY-ID\n");
        return 2;
    }
    keywarden::disable_core_dumps();
    keywarden::init_secure_heap();
    try {
        keywarden::pkcs11::TokenOptions tok;
        if (const char* m = std::getenv("KEYWARDEN_MODULE")) tok.module = m;
        if (const char* p = std::getenv("KEYWARDEN_PIN_SOURCE")) tok.pin_source = p;
        auto s = keywarden::keystore::open_store(tok, argv[1], /*writable=*/false);
        auto id = keywarden::keystore::KeyId::parse(argv[2]);
        keywarden::SecureBytes key = s.store->read_secret(id);  // the current version
        auto digest = keywarden::sha256(key);
        std::printf("%s: %zu bytes, sha256 prefix %s\n", argv[2], key.size(),
                    keywarden::to_hex(std::span(digest).first(4)).c_str());
        return 0;
    } catch (const keywarden::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return static_cast<int>(e.exit_code());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
