// SPDX-License-Identifier: Apache-2.0
// Opening a v2 store with its token: the path every command and application takes.
#include "keywarden/open_store.hpp"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "detail/format.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/log.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore_v1.hpp"
#include "keywarden/token_protector.hpp"

namespace keywarden::keystore {

CK_MECHANISM_TYPE mechanism_for(const std::string& method) {
    for (CK_MECHANISM_TYPE m : {CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP})
        if (pkcs11::AesWrapProtector::method_name(m) == method) return m;
    throw FormatError("the store uses key protection '" + method +
                      "', which this keywarden does not implement");
}

MasterKeys token_master_keys_v1(const pkcs11::TokenContext& ctx, CK_OBJECT_HANDLE master,
                                CK_MECHANISM_TYPE mech) {
    MasterKeys k;
    k.protector = std::make_unique<pkcs11::AesWrapProtector>(ctx.session, master, mech);
    k.mac = std::make_unique<pkcs11::TokenMacKey>(ctx.session, master, CKM_AES_CMAC);
    k.backend = std::make_unique<pkcs11::TokenKeyBackend>(ctx.session);
    return k;
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

// The store's files, its lock and its token, in that order: taking the lock before the token
// means writers of one store never use the token at the same time, which also keeps clear of
// SoftHSM's races between processes. Without --token, the store names its own token.
struct LockedStore {
    std::unique_ptr<Storage> storage;
    std::unique_ptr<StorageLock> lock;
    pkcs11::TokenContext token;
};

LockedStore lock_store_and_open_token(const pkcs11::TokenOptions& options, const std::string& path,
                                      bool writable) {
    LockedStore l;
    l.storage = open_file_storage(path);
    StoreMeta meta = read_store_meta(*l.storage);
    l.lock = l.storage->lock(writable);
    pkcs11::TokenOptions tok = options;
    if (tok.token.empty()) tok.token = "serial:" + meta.token_serial;
    l.token = pkcs11::open_token(tok, true);
    return l;
}

// `keys` names the master keys in messages: "master keys" (v2) or "master key" (v1).
void check_store_token(const pkcs11::TokenContext& token, const StoreMeta& meta, const char* keys) {
    if (token.token.serial != meta.token_serial)
        throw TokenError("the selected token (serial " + token.token.serial + ") is not the one holding this store's " +
                             keys,
                         master_key_hint(meta));
}

// A master key named by store.json, on the store's token. `what` is e.g. "master encryption key";
// `restore` the command that restores a store of this version.
CK_OBJECT_HANDLE find_store_key(const pkcs11::TokenContext& token, const MasterKeyRecord& r,
                                const std::string& what, const char* restore) {
    auto k = pkcs11::find_master_key(*token.session, r.label, r.id);
    if (!k)
        throw TokenError("the store's " + what + " '" + r.label + "' (id " + to_hex(r.id) +
                             ") is not on token '" + token.token.label + "'",
                         std::string("was it deleted? Without it the store cannot be opened: restore the "
                                     "store from a backup (") +
                             restore + ")");
    return k->handle;
}

}  // namespace

OpenStore open_store(const pkcs11::TokenOptions& options, const std::string& path, bool writable,
                     bool strict) {
    auto l = lock_store_and_open_token(options, path, writable);
    return open_store_on(std::move(l.token), std::move(l.storage), writable, strict, std::move(l.lock));
}

namespace {

// strict: 0 lenient, 1 strict, 2 streamed (KeyStore::open_streaming).
OpenStore open_v2(pkcs11::TokenContext token, std::unique_ptr<Storage> storage, bool writable, int mode,
                  std::unique_ptr<StorageLock> lock) {
    OpenStore s;
    s.meta = read_store_meta(*storage);
    s.token = std::move(token);
    check_store_token(s.token, s.meta, "master keys");
    s.encryption = find_store_key(s.token, s.meta.encryption, "master encryption key", "keywarden import");
    s.signature = find_store_key(s.token, s.meta.signature, "master signature key", "keywarden import");
    s.mechanism = mechanism_for(s.meta.protection);
    auto keys = token_master_keys(s.token, s.encryption, s.signature, s.mechanism);
    s.store = mode == 2 ? KeyStore::open_streaming(std::move(storage), std::move(keys), std::move(lock))
                        : KeyStore::open(std::move(storage), std::move(keys), writable, mode == 1, std::move(lock));
    return s;
}

}  // namespace

OpenStore open_store_on(pkcs11::TokenContext token, std::unique_ptr<Storage> storage,
                        bool writable, bool strict, std::unique_ptr<StorageLock> lock) {
    return open_v2(std::move(token), std::move(storage), writable, strict ? 1 : 0, std::move(lock));
}

OpenStore open_store_streaming(const pkcs11::TokenOptions& options, const std::string& path) {
    auto l = lock_store_and_open_token(options, path, false);
    return open_v2(std::move(l.token), std::move(l.storage), false, 2, std::move(l.lock));
}

void rebind_master_keys(OpenStore& s) {
    check_store_token(s.token, s.meta, "master keys");
    s.encryption = find_store_key(s.token, s.meta.encryption, "master encryption key", "keywarden import");
    s.signature = find_store_key(s.token, s.meta.signature, "master signature key", "keywarden import");
    auto keys = token_master_keys(s.token, s.encryption, s.signature, s.mechanism);
    // The keys found again must be the ones the store was opened with, by check value.
    if (keys.protector->key_check_value() != s.meta.encryption.kcv || keys.mac->key_check_value() != s.meta.signature.kcv)
        throw TokenError("after the module restart, the master keys found are not this store's",
                         "another object with the same label and id appeared on the token; check it with "
                         "'pkcs11-tool --list-objects'");
    s.store->keys() = std::move(keys);
}

OpenAnyStore open_any_store(const pkcs11::TokenOptions& options, const std::string& path,
                            bool writable, bool strict) {
    auto l = lock_store_and_open_token(options, path, writable);
    return open_any_store_on(std::move(l.token), std::move(l.storage), writable, strict, std::move(l.lock));
}

OpenAnyStore open_any_store_on(pkcs11::TokenContext token, std::unique_ptr<Storage> storage,
                               bool writable, bool strict, std::unique_ptr<StorageLock> lock) {
    OpenAnyStore out;
    out.meta = read_store_meta(*storage);
    if (out.meta.store_version == 2) {
        auto s = open_store_on(std::move(token), std::move(storage), writable, strict, std::move(lock));
        out.token = s.token;
        out.store = std::move(s.store);
        return out;
    }
    out.token = std::move(token);
    check_store_token(out.token, out.meta, "master key");
    CK_OBJECT_HANDLE k = find_store_key(out.token, out.meta.encryption, "master key",
                                        "keywarden backup --action=import");
    out.store = KeyStoreV1::open(std::move(storage),
                                 token_master_keys_v1(out.token, k, mechanism_for(out.meta.protection)),
                                 writable, std::move(lock));
    return out;
}

StoreMeta read_store_json(const std::string& path) {
    auto raw = open_file_storage(path)->read("store.json");
    if (!raw) throw NotFoundError("no store.json in " + path);
    try {
        return detail::meta_from_json(nlohmann::json::parse(*raw));
    } catch (const nlohmann::json::exception& e) {
        throw IntegrityError(std::string("store.json is not valid: ") + e.what());
    }
}

void refuse_existing_store(const std::string& path) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return;
    const std::filesystem::path dir(path);
    // store.json without the version file (written last): an init that did not finish.
    if (std::filesystem::is_directory(dir, ec) && std::filesystem::exists(dir / "store.json", ec) &&
        !std::filesystem::exists(dir / "version", ec)) {
        std::string keys;
        try {
            StoreMeta m = read_store_json(path);
            keys = " '" + m.encryption.label + "' (id " + to_hex(m.encryption.id) + ")";
            if (m.store_version != 1)
                keys += " and '" + m.signature.label + "' (id " + to_hex(m.signature.id) + ")";
            keys = "; its store.json names the master key" + std::string(m.store_version != 1 ? "s" : "") + keys +
                   " on token '" + m.token_label + "'";
        } catch (const std::exception&) {
        }
        throw ConflictError("refusing to initialise " + path +
                                ": it holds an unfinished store (store.json but no version file), left by an "
                                "init that was killed or failed" + keys,
                            "it holds no key ring. Delete those master keys with the token's tool if no "
                            "store uses them (keys you named with --master-*-key belong to another store), "
                            "remove the directory, and run init again");
    }
    // Only the store's .lock and temp files: an init killed before store.json (or one running).
    if (std::filesystem::is_directory(dir, ec) && !std::filesystem::exists(dir / "store.json", ec) &&
        !std::filesystem::exists(dir / "version", ec) && !std::filesystem::is_empty(dir, ec)) {
        bool only_init_files = true;
        for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
            const std::string n = e.path().filename().string();
            only_init_files = only_init_files && e.is_regular_file(ec) && (n == ".lock" || n.starts_with(".tmp-"));
        }
        if (only_init_files)
            throw ConflictError("refusing to initialise " + path +
                                    ": it holds an unfinished store (no store.json yet, only its .lock), left by an "
                                    "init that was killed, or made by one still running",
                                "when no init is running, remove it (rm -r: it holds no key) and run init again; "
                                "that run also removes the master keys the killed one had recorded beside it");
    }
    if (!std::filesystem::is_directory(path, ec) || !std::filesystem::is_empty(path, ec))
        throw ConflictError("refusing to initialise " + path +
                                ": it already exists and is not an empty directory",
                            "keywarden init never touches an existing store; choose another "
                            "--keystore path");
}

namespace {

// A master key: generated in the token (its handle is added to `created`), or the key a
// pkcs11: URI names, checked for the role.
pkcs11::MasterKeyInfo obtain_master(pkcs11::TokenContext& ctx, const std::string& uri,
                                    pkcs11::MasterRole role, const MasterKeyRecord& planned,
                                    const InitParams& p, std::vector<CK_OBJECT_HANDLE>& created) {
    pkcs11::MasterKeyInfo info;
    if (uri.empty()) {
        info = pkcs11::generate_master_key(*ctx.session, role, planned.label, planned.id);
        created.push_back(info.handle);
        log::info("generated master key '" + info.label + "' in the token");
        return info;
    }
    auto found = pkcs11::find_key_by_uri(*ctx.session, uri);
    info = pkcs11::describe_master_key(*ctx.session, found.handle, role);
    if (info.label.empty() || info.id.empty())
        throw TokenError("the key named by " + uri + " has no label or no CKA_ID",
                         "give it both, so the store can find it again");
    if (!info.sensitive)
        throw TokenError("master key '" + info.label + "' is not sensitive (CKA_SENSITIVE=false)",
                         "its value can be read from the token: use a sensitive key");
    // A wrapping key that may also decrypt lets anyone with the PIN decrypt a wrapped
    // store key out of the token (wrap, then C_Decrypt the blob).
    if (role != pkcs11::MasterRole::signature &&
        (ctx.session->get_bool(found.handle, CKA_DECRYPT).value_or(false) ||
         ctx.session->get_bool(found.handle, CKA_ENCRYPT).value_or(false)))
        throw TokenError("master key '" + info.label + "' also allows encrypt or decrypt",
                         "a wrapping key that can decrypt lets wrapped keys be decrypted out "
                         "of the token: use a key with CKA_WRAP/CKA_UNWRAP only");
    if (info.extractable) {
        if (!p.allow_extractable_master)
            throw TokenError("master key '" + info.label +
                                 "' is extractable (CKA_EXTRACTABLE=true): it could leave "
                                 "the token",
                             "use a non-extractable key, or pass "
                             "--allow-extractable-master if you accept the risk");
        log::warn("master key '" + info.label + "' is extractable: its value can leave the token");
    }
    return info;
}

StoreMeta new_meta(pkcs11::TokenContext& ctx) {
    StoreMeta meta;
    std::uint8_t id[16];
    ctx.session->random(id);
    meta.store_id = to_hex(id);
    meta.token_serial = ctx.token.serial;
    meta.token_label = ctx.token.label;
    meta.token_model = ctx.token.model;
    return meta;
}

// The label and CKA_ID a master key init generates will get; empty for a key named by URI.
MasterKeyRecord planned_key(pkcs11::TokenContext& ctx, const StoreMeta& meta, const std::string& uri,
                            pkcs11::MasterRole role) {
    MasterKeyRecord r;
    if (!uri.empty()) return r;
    r.label = generated_master_label(meta.store_id, role);
    r.id.resize(16);
    ctx.session->random(r.id);
    return r;
}

CK_MECHANISM_TYPE wrap_mechanism_of(pkcs11::TokenContext& ctx) {
    auto mech = pkcs11::AesWrapProtector::choose_mechanism(*ctx.session);
    if (!mech)
        throw TokenError("token '" + ctx.token.label + "' offers no AES key wrap mechanism",
                         "run 'keywarden token check'; tokens without AES (smartcards) are not "
                         "supported by this version");
    return *mech;
}

}  // namespace

std::string generated_master_label(const std::string& store_id, pkcs11::MasterRole role) {
    const char* suffix = role == pkcs11::MasterRole::encryption  ? "-enc"
                         : role == pkcs11::MasterRole::signature ? "-sig"
                                                                 : "-v1";
    return "keywarden-" + store_id.substr(0, 8) + suffix;
}

StoreMeta init_store(pkcs11::TokenContext& ctx, const std::string& path, const InitParams& p) {
    refuse_existing_store(path);
    auto storage = open_file_storage(path);
    CK_MECHANISM_TYPE mech = wrap_mechanism_of(ctx);
    StoreMeta meta = new_meta(ctx);
    meta.encryption = planned_key(ctx, meta, p.master_encryption_key, pkcs11::MasterRole::encryption);
    meta.signature = planned_key(ctx, meta, p.master_signature_key, pkcs11::MasterRole::signature);
    if (p.before_generating) p.before_generating(meta);
    std::vector<CK_OBJECT_HANDLE> created;
    try {
        auto enc = obtain_master(ctx, p.master_encryption_key, pkcs11::MasterRole::encryption, meta.encryption, p,
                                 created);
        auto sig = obtain_master(ctx, p.master_signature_key, pkcs11::MasterRole::signature, meta.signature, p,
                                 created);
        meta.encryption = {enc.label, enc.id, {}};
        meta.signature = {sig.label, sig.id, {}};
        auto keys = token_master_keys(ctx, enc.handle, sig.handle, mech);
        KeyStore::init(*storage, keys, meta, p.before_completing);
    } catch (...) {
        // Generated master keys are deleted again; named ones are never touched.
        for (auto h : created) pkcs11::destroy_object(*ctx.session, h);
        throw;
    }
    return read_store_meta(*storage);
}

StoreMeta init_store_v1(pkcs11::TokenContext& ctx, const std::string& path, const InitParams& p) {
    refuse_existing_store(path);
    if (!p.master_signature_key.empty())
        throw UsageError("a v1 store has one master key: --master-signature-key does not apply",
                         "name it with --master-encryption-key, or leave both out");
    if (!ctx.session->has_mechanism(CKM_AES_CMAC))
        throw TokenError("token '" + ctx.token.label + "' offers no AES-CMAC (CKM_AES_CMAC), which a "
                         "v1 store needs to authenticate its key files",
                         "create a v2 store instead (keywarden init), which uses HMAC");
    auto storage = open_file_storage(path);
    CK_MECHANISM_TYPE mech = wrap_mechanism_of(ctx);
    StoreMeta meta = new_meta(ctx);
    meta.store_version = 1;
    meta.encryption = planned_key(ctx, meta, p.master_encryption_key, pkcs11::MasterRole::single);
    if (p.before_generating) p.before_generating(meta);
    std::vector<CK_OBJECT_HANDLE> created;
    try {
        auto key = obtain_master(ctx, p.master_encryption_key, pkcs11::MasterRole::single, meta.encryption, p,
                                 created);
        meta.encryption = {key.label, key.id, {}};
        auto keys = token_master_keys_v1(ctx, key.handle, mech);
        KeyStoreV1::init(*storage, keys, meta, p.before_completing);
    } catch (...) {
        for (auto h : created) pkcs11::destroy_object(*ctx.session, h);
        throw;
    }
    return read_store_meta(*storage);
}

}  // namespace keywarden::keystore
