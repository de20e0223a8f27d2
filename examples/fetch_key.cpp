// SPDX-License-Identifier: Apache-2.0
// How an application fetches a key from a keywarden store, through the public C++ API
// (include/keywarden/reader.hpp): it builds with the public headers alone.
//
//   fetch_key KEYSTORE KEY-ID
//
// The token is found from the store's own metadata; the module and PIN come from the
// environment as for the CLI (KEYWARDEN_MODULE, KEYWARDEN_PIN or KEYWARDEN_PIN_SOURCE). The
// example prints the key's length and the first bytes of its SHA-256, never the key itself.
#include <openssl/evp.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <span>

#include "keywarden/encoding.hpp"
#include "keywarden/reader.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: fetch_key KEYSTORE KEY-ID\n");
        return 2;
    }
    keywarden::disable_core_dumps();
    keywarden::init_secure_heap();
    try {
        keywarden::TokenOptions tok;
        if (const char* m = std::getenv("KEYWARDEN_MODULE")) tok.module = m;
        if (const char* p = std::getenv("KEYWARDEN_PIN_SOURCE")) tok.pin_source = p;
        auto store = keywarden::StoreReader::open(argv[1], tok);
        keywarden::SecureBytes key = store.read_secret(argv[2]);  // the current version
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int n = 0;
        if (EVP_Digest(key.data(), key.size(), digest, &n, EVP_sha256(), nullptr) != 1) return 1;
        std::printf("%s: %zu bytes, sha256 prefix %s\n", argv[2], key.size(),
                    keywarden::to_hex(std::span(digest, 4)).c_str());
        return 0;
    } catch (const keywarden::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return static_cast<int>(e.exit_code());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
