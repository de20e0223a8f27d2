// SPDX-License-Identifier: Apache-2.0
// Opening a v2 store with its token: the path every command and application takes.
#include "keywarden/open_store.hpp"

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/token_protector.hpp"

namespace keywarden::keystore {

CK_MECHANISM_TYPE mechanism_for(const std::string& method) {
    for (CK_MECHANISM_TYPE m : {CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP})
        if (pkcs11::AesWrapProtector::method_name(m) == method) return m;
    throw FormatError("the store uses key protection '" + method +
                      "', which this keywarden does not implement");
}

MasterKeys token_master_keys(const pkcs11::TokenContext& ctx, CK_OBJECT_HANDLE enc, CK_OBJECT_HANDLE sig,
                             CK_MECHANISM_TYPE mech) {
    MasterKeys k;
    k.protector = std::make_unique<pkcs11::AesWrapProtector>(ctx.session, enc, mech);
    k.mac = std::make_unique<pkcs11::TokenMacKey>(ctx.session, sig);
    k.backend = std::make_unique<pkcs11::TokenKeyBackend>(ctx.session);
    return k;
}

namespace {
std::string master_key_hint(const StoreMeta& meta) {
    return "the store was created on token '" + meta.token_label + "' (serial " +
           meta.token_serial + "); select that token with --token serial:" + meta.token_serial;
}

}  // namespace

OpenStore open_store(const pkcs11::TokenOptions& options, const std::string& path, bool writable,
                     bool strict) {
    OpenStore s;
    auto storage = open_file_storage(path);
    s.meta = read_store_meta(*storage);
    // Lock first: writers of one store then never use the token at the same time, which also
    // keeps clear of SoftHSM's races between processes.
    auto lock = storage->lock(writable);
    pkcs11::TokenOptions tok = options;
    // Without --token, the store names its own token.
    if (tok.token.empty()) tok.token = "serial:" + s.meta.token_serial;
    s.token = pkcs11::open_token(tok, true);
    if (s.token.token.serial != s.meta.token_serial)
        throw TokenError("the selected token (serial " + s.token.token.serial +
                             ") is not the one holding this store's master keys",
                         master_key_hint(s.meta));
    auto find = [&](const MasterKeyRecord& r, const char* role) {
        auto k = pkcs11::find_master_key(*s.token.session, r.label, r.id);
        if (!k)
            throw TokenError(std::string("the store's master ") + role + " key '" + r.label +
                                 "' (id " + to_hex(r.id) + ") is not on token '" +
                                 s.token.token.label + "'",
                             "was it deleted? Without it the store cannot be opened: restore "
                             "the store from a backup (keywarden import)");
        return k->handle;
    };
    CK_OBJECT_HANDLE enc = find(s.meta.encryption, "encryption");
    CK_OBJECT_HANDLE sig = find(s.meta.signature, "signature");
    s.store = KeyStore::open(std::move(storage),
                             token_master_keys(s.token, enc, sig, mechanism_for(s.meta.protection)),
                             writable, strict, std::move(lock));
    return s;
}


}  // namespace keywarden::keystore
