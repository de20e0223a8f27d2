// SPDX-License-Identifier: Apache-2.0
// The public entry point for applications: open a v2 store on its token and fetch keys.
//
//   keywarden::pkcs11::TokenOptions tok;            // module, token, pin source
//   tok.module = "/usr/lib/softhsm/libsofthsm2.so";
//   auto s = keywarden::keystore::open_store(tok, "/var/lib/app/keystore", false);
//   keywarden::SecureBytes key = s.store->read_secret(
//       keywarden::keystore::KeyId::parse("client/alice01/symmetric"));
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "keywarden/keystore.hpp"
#include "keywarden/token_context.hpp"
#include "keywarden/token_protector.hpp"

namespace keywarden::keystore {

struct OpenStore {
    pkcs11::TokenContext token;
    StoreMeta meta;
    std::unique_ptr<KeyStore> store;
    // The master keys as found in the token, to build a second MasterKeys (import staging).
    CK_OBJECT_HANDLE encryption = CK_INVALID_HANDLE, signature = CK_INVALID_HANDLE;
    CK_MECHANISM_TYPE mechanism = 0;
};

// Opens a v2 store read-only for one streamed pass over every ring (KeyStore::open_streaming):
// export --all of a large store, in memory that does not grow with the store.
OpenStore open_store_streaming(const pkcs11::TokenOptions& options, const std::string& path);

// After pkcs11::restart_token(s.token): finds the master keys again on the new session and gives
// the store protectors that use them (the old handles are gone with the old session).
void rebind_master_keys(OpenStore& s);

struct InitParams {
    std::string master_encryption_key, master_signature_key;  // pkcs11: URIs; empty: generate
    bool allow_extractable_master = false;
    // Called once before any master key is generated, with the new store's id, version and token
    // and, for each key to be generated, the label and CKA_ID it will get (the records of keys
    // named by URI are empty). Nothing is generated if it throws. import --init records them, so
    // that the keys of a run killed before store.json exists can still be found and removed.
    std::function<void(const StoreMeta&)> before_generating;
    // Called once store.json names the master keys, before the version file makes the directory
    // a store: the record of planned keys goes there (PlannedKeysRecord::stored), so that it never
    // outlives the unfinished store into a finished one.
    std::function<void()> before_completing;
};

// The store.json of the directory at path, also of an unfinished store (no version file yet, as
// an init that was killed leaves it). Throws when there is none or it does not parse.
StoreMeta read_store_json(const std::string& path);

// Throws ConflictError when path exists and is not an empty directory.
void refuse_existing_store(const std::string& path);

// The label init gives a master key it generates for the store `store_id`:
// "keywarden-<first 8 of store_id>-enc", "-sig", or "-v1" (a v1 store's single key).
std::string generated_master_label(const std::string& store_id, pkcs11::MasterRole role);

// Creates an empty v2 store at path with master keys generated in the token (or named by URI).
// Generated master keys are deleted again if anything fails; named ones are never touched.
StoreMeta init_store(pkcs11::TokenContext& ctx, const std::string& path, const InitParams& p);

// Reads store.json, takes the store lock (before the token, so writers of one store never use
// the token at the same time), selects the store's token (by its recorded serial unless
// options.token says otherwise), logs in, finds the master keys and opens the store.
OpenStore open_store(const pkcs11::TokenOptions& options, const std::string& path, bool writable,
                     bool strict = true);

// The same on a token that is already open, for a storage the caller chose (import staging).
// `lock`, if given, is a lock on the store the caller already holds.
OpenStore open_store_on(pkcs11::TokenContext token, std::unique_ptr<Storage> storage, bool writable,
                        bool strict = true, std::unique_ptr<StorageLock> lock = nullptr);

// The key-protection method name recorded in store.json -> the token mechanism.
CK_MECHANISM_TYPE mechanism_for(const std::string& method);

// ---- either store version ---------------------------------------------------------------

struct OpenAnyStore {
    pkcs11::TokenContext token;
    StoreMeta meta;
    std::unique_ptr<Store> store;
};

// Opens the store at path, v1 or v2 (the version file says which), as open_store does.
OpenAnyStore open_any_store(const pkcs11::TokenOptions& options, const std::string& path,
                            bool writable, bool strict = true);
// The same on a token that is already open.
OpenAnyStore open_any_store_on(pkcs11::TokenContext token, std::unique_ptr<Storage> storage,
                               bool writable, bool strict = true,
                               std::unique_ptr<StorageLock> lock = nullptr);

// Creates an empty v1 store: one master key generated in the token (AES-256 with wrap/unwrap
// and AES-CMAC sign/verify), or named by p.master_encryption_key. The token must offer
// CKM_AES_CMAC. Generated keys are deleted again if anything fails.
StoreMeta init_store_v1(pkcs11::TokenContext& ctx, const std::string& path, const InitParams& p);

// The v1 store's master keys: the same token key wraps (AES key wrap) and signs (AES-CMAC).
MasterKeys token_master_keys_v1(const pkcs11::TokenContext& ctx, CK_OBJECT_HANDLE master,
                                CK_MECHANISM_TYPE mech);

// Master keys backed by the token: AES key wrap, HMAC, and key generation in the session.
MasterKeys token_master_keys(const pkcs11::TokenContext& ctx, CK_OBJECT_HANDLE enc,
                             CK_OBJECT_HANDLE sig, CK_MECHANISM_TYPE mech);

}  // namespace keywarden::keystore
