// SPDX-License-Identifier: Apache-2.0
// The public entry point for applications: open a v2 store on its token and fetch keys.
//
//   keywarden::pkcs11::TokenOptions tok;            // module, token, pin source
//   tok.module = "/usr/lib/softhsm/libsofthsm2.so";
//   auto s = keywarden::keystore::open_store(tok, "/var/lib/app/keystore", false);
//   keywarden::SecureBytes key = s.store->read_secret(
//       keywarden::keystore::KeyId::parse("client/alice01/symmetric"));
#pragma once

#include <memory>
#include <string>

#include "keywarden/keystore.hpp"
#include "keywarden/token_context.hpp"

namespace keywarden::keystore {

struct OpenStore {
    pkcs11::TokenContext token;
    StoreMeta meta;
    std::unique_ptr<KeyStore> store;
};

// Reads store.json, takes the store lock (before the token, so writers of one store never use
// the token at the same time), selects the store's token (by its recorded serial unless
// options.token says otherwise), logs in, finds the master keys and opens the store.
OpenStore open_store(const pkcs11::TokenOptions& options, const std::string& path, bool writable,
                     bool strict = true);

// The key-protection method name recorded in store.json -> the token mechanism.
CK_MECHANISM_TYPE mechanism_for(const std::string& method);

// Master keys backed by the token: AES key wrap, HMAC, and key generation in the session.
MasterKeys token_master_keys(const pkcs11::TokenContext& ctx, CK_OBJECT_HANDLE enc,
                             CK_OBJECT_HANDLE sig, CK_MECHANISM_TYPE mech);

}  // namespace keywarden::keystore
