// SPDX-License-Identifier: Apache-2.0
// Key store v1: Acra's flat one-file-per-key layout, with one master key in the token.
// Format: docs/keystore-format.md, part 2.
//
//   <client>_storage, <client>_storage.pub   storage keypair (client/<id>/storage)
//   <client>_storage_sym                     symmetric key   (client/<id>/symmetric)
//   <client>_hmac                            HMAC key        (client/<id>/hmac)
//   secure_log_key                           audit log key   (audit/log)
//   .poison_key/poison_key, .pub             poison keypair  (poison/keypair)
//   .poison_key/poison_key_sym               poison symmetric key (poison/symmetric)
//   <file>.old/<UTC time>                    versions rotated out of <file>
//
// Each key file holds one key version wrapped under the master key (AES key wrap in the token),
// in metadata that names the store, the key id, the file's own path, the key's kind and length,
// authenticated with AES-CMAC under the same master key in the token. There is no manifest: a
// deleted file or a whole-store rollback is not detected (v2 detects both).
#pragma once

#include <map>

#include "keywarden/keystore.hpp"

namespace keywarden::keystore {

// The file of a ring's current version, relative to the store root. Throws UsageError for a
// client id too long for a file name (over 239 characters: v2 stores have no such limit).
std::string v1_file(const KeyId& id);
// The ring a current-version file name belongs to; nullopt for any other name.
std::optional<KeyId> v1_key_id_of(const std::string& file);

class KeyStoreV1 : public Store {
public:
    // Creates an empty v1 store: version file ("keywarden-keystore 1"), store.json, lock file.
    // keys.protector and keys.mac must both use the one master key.
    // before_version: as KeyStore::init.
    static void init(Storage& storage, MasterKeys& keys, StoreMeta meta,
                     const std::function<void()>& before_version = {});
    static std::unique_ptr<KeyStoreV1> open(std::unique_ptr<Storage> storage, MasterKeys keys,
                                            bool writable, std::unique_ptr<StorageLock> lock = nullptr);
    ~KeyStoreV1() override;

    int store_version() const override { return 1; }
    const StoreMeta& meta() const override { return m_meta; }
    MasterKeys& keys() override { return m_keys; }
    Storage& storage() override { return *m_storage; }
    std::uint64_t generation() const override { return 0; }
    std::vector<RingSummary> list() const override;
    std::vector<KeyId> key_ids() const override;
    bool contains(const KeyId& id) const override;
    KeyRing load(const KeyId& id, bool check_mac = true) const override;
    void generate(const std::vector<KeyId>& ids,
                  const std::function<void(std::size_t)>& progress = {}) override;
    const MasterKeys& master_keys() const override { return m_keys; }
    void destroy(const KeyId& id, std::optional<std::uint32_t> version) override;
    VerifyReport verify(const std::function<void(std::size_t)>& progress = {}) const override;

    // Writes a whole ring whose keys are already wrapped under this store's master key (import):
    // the current (else the newest) version into the key file, the others under <file>.old/.
    // Refuses a ring that already has files. Files are written unsynced; call sync() after.
    void put_ring(const KeyRing& r);
    void sync() { m_storage->sync(); }

private:
    KeyStoreV1(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable);
    struct Loaded;
    Loaded load_files(const KeyId& id) const;        // throws NotFoundError
    std::optional<Loaded> find_files(const KeyId& id) const;  // nullopt: no file of this key
    void write_key_file(const std::string& file, const KeyRing& single, bool synced);
    void write_pub_file(const KeyId& id, const KeyVersion& v, bool synced);
    std::string fresh_stamp(const std::string& file, std::int64_t seconds, int micros) const;

    std::unique_ptr<Storage> m_storage;
    MasterKeys m_keys;
    bool m_writable;
    std::unique_ptr<StorageLock> m_lock;
    StoreMeta m_meta;
};

}  // namespace keywarden::keystore
