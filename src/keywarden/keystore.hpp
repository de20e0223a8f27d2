// SPDX-License-Identifier: Apache-2.0
// Key store v2: key rings of versioned keys, wrapped under master keys that stay in a token.
// This is also the small public API for applications: open a store, fetch a key by id.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "keywarden/key_protector.hpp"
#include "keywarden/storage.hpp"

namespace keywarden::keystore {

// ---- the model ------------------------------------------------------------------------------

enum class RingKind {
    storage_keypair,   // client/<id>/storage     EC P-256
    symmetric,         // client/<id>/symmetric   AES-256
    hmac,              // client/<id>/hmac        32-byte HMAC key
    poison_keypair,    // poison/keypair          EC P-256
    poison_symmetric,  // poison/symmetric        AES-256
    audit_log,         // audit/log               32-byte HMAC key
};
const char* ring_kind_name(RingKind k);
std::optional<RingKind> ring_kind_from_name(const std::string& s);
KeyKind key_kind_of(RingKind k);
bool has_public(RingKind k);

// NIST SP 800-57 key states.
enum class KeyState { pre_active, active, suspended, deactivated, compromised, destroyed };
const char* key_state_name(KeyState s);
std::optional<KeyState> key_state_from_name(const std::string& s);

// Client ids follow Acra's rule: 5 to 256 characters from [A-Za-z0-9_ -]. Throws UsageError
// that shows the rule.
void validate_client_id(const std::string& id);
extern const char* const kClientIdRule;

// A key id names a key ring: "client/<client id>/storage|symmetric|hmac", "poison/keypair",
// "poison/symmetric" or "audit/log".
struct KeyId {
    RingKind kind;
    std::string client_id;  // empty for global rings
    std::string str() const;
    // Where the ring's file lives, relative to the store root.
    std::string file() const;
    static KeyId parse(const std::string& s);  // throws UsageError
    static KeyId client(RingKind kind, const std::string& client_id);
    static KeyId global(RingKind kind);
    bool operator<(const KeyId& o) const { return str() < o.str(); }
    bool operator==(const KeyId& o) const { return str() == o.str(); }
};

struct KeyVersion {
    std::uint32_t version = 0;
    KeyState state = KeyState::active;
    std::int64_t created = 0;     // Unix seconds, UTC
    std::int64_t valid_from = 0;
    std::optional<std::int64_t> valid_until;
    KeyKind key_type = KeyKind::aes;  // true type: SoftHSM does not check types on unwrap
    std::uint32_t key_length = 32;    // true length: SoftHSM pads lengths
    std::string protection;           // the KeyProtector method that made `wrapped`
    Bytes wrapped;                    // empty once destroyed
    Bytes kcv;                        // key check value, 8 bytes (KeyBackend::check_value)
    Bytes public_key;                 // 65-byte uncompressed point for keypairs
};

struct KeyRing {
    KeyId id;
    std::optional<std::uint32_t> current;
    std::vector<KeyVersion> versions;
    const KeyVersion* find(std::uint32_t v) const;
    KeyVersion* find(std::uint32_t v);
};

// What `list` shows: no key material, no wrapped blobs.
struct VersionSummary {
    std::uint32_t version;
    KeyState state;
    std::int64_t created, valid_from;
    std::optional<std::int64_t> valid_until;
    bool current;
};
struct RingSummary {
    std::string key_id;
    RingKind kind;
    std::string client_id;
    std::vector<VersionSummary> versions;
    // Set by list() instead of versions when the ring's files could not be read (a v1 store has
    // no manifest: its list reads every key file, and a damaged one must not hide the others).
    std::string problem;
};

// ---- the store's own metadata (store.json) --------------------------------------------------

struct MasterKeyRecord {
    std::string label;
    Bytes id;   // CKA_ID
    Bytes kcv;  // KeyProtector::key_check_value / MacKey::key_check_value
};

struct StoreMeta {
    int format = 1;
    int store_version = 2;  // 1: one master key (signature == encryption), flat Acra v1 layout
    std::string store_id;  // 32 hex characters, random
    std::int64_t created = 0;
    std::string token_serial, token_label, token_model;
    std::string protection;  // the KeyProtector method, e.g. "aes-key-wrap-pad"
    MasterKeyRecord encryption, signature;
};

// What a store needs from its token (or, in unit tests, from host memory).
struct MasterKeys {
    std::unique_ptr<KeyProtector> protector;  // wraps under the master encryption key
    std::unique_ptr<MacKey> mac;              // the master signature key
    std::unique_ptr<KeyBackend> backend;      // where transient keys are made and checked
};

// ---- operations -----------------------------------------------------------------------------

struct GenerateRequest {
    KeyId id;
};

struct VerifyProblem {
    std::string key_id;  // or "manifest", "store.json", a file name
    std::string problem;
};
struct VerifyReport {
    std::size_t rings = 0, keys_checked = 0;
    std::vector<VerifyProblem> problems;
    bool ok() const { return problems.empty(); }
};

// The layout and manifest files (relative to the store root).
extern const char* const kVersionFile;   // "version": "keywarden-keystore 2\n"
extern const char* const kMetaFile;      // "store.json"
extern const char* const kManifestFile;  // "manifest"

// Reads the store's version file and store.json without a token: enough to know which token
// and master keys to open. Either store version; meta.store_version says which. Throws
// NotFoundError / FormatError.
StoreMeta read_store_meta(const Storage& storage);
// The store format version in the version file (1 or 2); nullopt when there is none.
std::optional<int> detect_store_version(const Storage& storage);

// What every store version offers. The commands generate, rotate, list, read, destroy and
// keystore verify, and the v1 backup, work through this, so that they behave the same on v1
// and v2 stores.
class Store {
public:
    virtual ~Store() = default;
    virtual int store_version() const = 0;
    virtual const StoreMeta& meta() const = 0;
    virtual MasterKeys& keys() = 0;
    virtual Storage& storage() = 0;
    // A counter that grows with every write (v2: the manifest generation; v1 has none: 0).
    virtual std::uint64_t generation() const = 0;
    // Every ring, sorted by key id.
    virtual std::vector<RingSummary> list() const = 0;
    virtual std::vector<KeyId> key_ids() const = 0;
    virtual bool contains(const KeyId& id) const = 0;
    // The whole ring, authenticated. check_mac=false may skip a token MAC where something else
    // already authenticates the bytes (v2: the manifest digest); v1 always checks.
    virtual KeyRing load(const KeyId& id, bool check_mac = true) const = 0;
    // Adds a new current version to each ring (creating rings as needed). The previous current
    // version becomes deactivated, valid until now. Duplicate ids in one batch are refused.
    virtual void generate(const std::vector<KeyId>& ids,
                          const std::function<void(std::size_t)>& progress = {}) = 0;
    virtual const MasterKeys& master_keys() const = 0;
    // The key material of a version (the current one by default): unwrapped in the token as a
    // non-sensitive session object, read, and destroyed. Throws for destroyed versions.
    SecureBytes read_secret(const KeyId& id, std::optional<std::uint32_t> version = {}) const;
    Bytes read_public(const KeyId& id, std::optional<std::uint32_t> version = {}) const;
    // Wipes one version's wrapped key and marks it destroyed (nullopt: every version).
    virtual void destroy(const KeyId& id, std::optional<std::uint32_t> version) = 0;
    // Checks every MAC, unwraps every live key in the token and compares its key check value.
    virtual VerifyReport verify(const std::function<void(std::size_t)>& progress = {}) const = 0;
};

namespace detail {
struct ManifestData;
}

class KeyStore : public Store {
public:
    // Creates an empty store: version file, store.json, an empty signed manifest, the lock
    // file. Refuses a non-empty directory.
    // before_version runs once store.json and the manifest are written and synced, before the
    // version file (written last) makes the directory a store.
    static void init(Storage& storage, MasterKeys& keys, StoreMeta meta,
                     const std::function<void()>& before_version = {});

    // Opens a store: takes the lock (shared, or exclusive when writable), finishes or rolls
    // back an interrupted write, checks the master key check values against store.json, verifies
    // the manifest MAC and that the files on disk are exactly those it names.
    // strict=false (for `keystore verify`) records missing and extra files as problems for
    // verify() instead of throwing.
    // `lock`, if given, is a lock the caller already holds (taken before the token was opened,
    // so that writers of one store never touch the token at the same time).
    static std::unique_ptr<KeyStore> open(std::unique_ptr<Storage> storage, MasterKeys keys,
                                          bool writable, bool strict = true,
                                          std::unique_ptr<StorageLock> lock = nullptr);
    // Opens read-only for one pass over every ring (export of a large store), without holding
    // the manifest in memory: the manifest is streamed from disk, its MAC checked and its SHA-256
    // kept, and the ring files are not listed (a missing one is found when it is read). Such a
    // store offers ring_count(), version_count() and rings(); the other reading calls throw.
    static std::unique_ptr<KeyStore> open_streaming(std::unique_ptr<Storage> storage, MasterKeys keys,
                                                    std::unique_ptr<StorageLock> lock = nullptr);
    ~KeyStore();

    // Every ring in key id order, each read as load(id, check_mac) reads it. On a streaming
    // store the manifest is read again from disk; after the last ring its bytes are compared
    // with those authenticated at open (IntegrityError if they changed in between).
    class RingCursor {
    public:
        RingCursor(RingCursor&&) noexcept;
        ~RingCursor();
        std::optional<KeyRing> next();
        // Passes over the next ring without reading its file; false after the last one.
        bool skip();

    private:
        friend class KeyStore;
        struct State;
        explicit RingCursor(std::unique_ptr<State> s);
        std::unique_ptr<State> m;
    };
    // filter: only the rings it accepts (the others are passed over without reading their file).
    RingCursor rings(bool check_mac, std::function<bool(const KeyId&)> filter = {}) const;
    struct Counts {
        std::size_t rings = 0, versions = 0;
        bool operator==(const Counts&) const = default;
    };
    // Rings and versions per kind (a full export's entry counts), on a streamed store too.
    std::map<RingKind, Counts> counts_by_kind() const;

    int store_version() const override { return 2; }
    const StoreMeta& meta() const override { return m_meta; }
    Storage& storage() override { return *m_storage; }
    MasterKeys& keys() override { return m_keys; }
    std::uint64_t generation() const override;

    // Every ring, sorted by key id, from the signed manifest.
    std::vector<RingSummary> list() const override;
    std::vector<KeyId> key_ids() const override;
    bool contains(const KeyId& id) const override;
    // The number of versions of a ring the store holds, from the manifest (no ring file read).
    std::size_t version_count(const KeyId& id) const;

    // Reads a ring file, checking its digest against the manifest and its MAC before parsing.
    // check_mac=false skips the token MAC for bulk reads (export): the digest alone already ties
    // the bytes to the manifest, whose MAC was verified when the store was opened.
    KeyRing load(const KeyId& id, bool check_mac = true) const override;

    // Adds a new current version to each ring (creating rings as needed). The previous current
    // version becomes deactivated, valid until now. One manifest update for the whole batch.
    // Duplicate ids in one batch are refused.
    void generate(const std::vector<KeyId>& ids,
                  const std::function<void(std::size_t)>& progress = {}) override;

    // A written ring's record: how a ring file written by one Writer (a --jobs worker's, in
    // another process) is taken into another's commit.
    struct PendingRing {
        std::string key_id, file, sha256;
        RingSummary summary;
    };
    // A written ring's record as one line of text (its manifest member), and back: how --jobs
    // workers hand their rings to the parent.
    static std::string pending_text(const PendingRing& p);
    static PendingRing pending_from_text(std::string_view line);

    // The one way to write rings into a store (import, migrate; generate, rotate and destroy use
    // it inside). Nothing a writer writes is visible before its commit(), which makes every ring
    // it took visible at once, or none. Writing a ring has two halves, so that the file I/O can
    // run on another thread than the token work: seal() signs the ring file in the token;
    // write() only writes it (no token call). take() adds a written ring to the commit.
    class Writer {
    public:
        enum class Mode {
            // Each ring as a pending file beside its ring file; commit() is one manifest update.
            // Without commit() the writer removes its pending files: the store is as it was.
            update,
            // A store that holds no ring yet (import --init's private staging copy): each ring
            // under its final name at once, its manifest member to a scratch file; commit()
            // syncs, writes the signed manifest by streaming that file, and closes the store.
            // Rings normally come in key id order; out of order their members are kept in
            // memory instead. A ring taken twice is refused.
            fill,
        };
        ~Writer();
        Writer(const Writer&) = delete;
        Writer& operator=(const Writer&) = delete;

        Bytes seal(const KeyRing& ring);
        PendingRing write(const KeyRing& ring, const Bytes& sealed);
        // A ring this writer, or a part writer in another process, wrote; with `text`, its
        // pending_text() as read back (saves making it again).
        void take(const PendingRing& p, std::string text = {});
        // seal, write and take.
        void put(const KeyRing& ring);
        void commit();

    private:
        friend class KeyStore;
        struct State;
        explicit Writer(std::unique_ptr<State> s);
        std::unique_ptr<State> m;
    };
    // A writer of this store's next commit. `scratch_dir` (fill): where the manifest members
    // wait for the commit. fill throws on a store that holds rings.
    std::unique_ptr<Writer> writer(Writer::Mode mode, const std::string& scratch_dir = {});
    // A writer for a --jobs worker, in its own process on its own store handle: seal() and
    // write() as the committing writer's `mode` says, nothing to take or commit, nothing removed
    // when it goes (the committing writer takes what it wrote).
    std::unique_ptr<Writer> part_writer(Writer::Mode mode);

    // The key material of a version (the current one by default): unwrapped in the token as a
    // non-sensitive session object, read, and destroyed. Throws for destroyed versions.
    const MasterKeys& master_keys() const override { return m_keys; }

    // Wipes one version's wrapped key and marks it destroyed (nullopt: every version).
    void destroy(const KeyId& id, std::optional<std::uint32_t> version) override;

    // Checks every MAC and the manifest, unwraps every live key in the token and compares its
    // key check value. Prints nothing; returns the problems per ring.
    VerifyReport verify(const std::function<void(std::size_t)>& progress = {}) const override;

    // A fresh ring version's material comes from the backend; exposed for tests and backups.
    KeyVersion make_version(const KeyId& id, std::uint32_t number, std::int64_t now);

private:
    KeyStore(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable);
    static std::unique_ptr<KeyStore> open_impl(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable,
                                               int mode, std::unique_ptr<StorageLock> lock);
    struct Manifest;
    struct Streamed;
    Manifest& manifest() const;
    KeyRing load_entry(const KeyId& id, const std::string& file, const std::string& sha256, bool check_mac) const;
    void load_manifest();
    void scan_manifest();
    void check_manifest_top(const detail::ManifestData& m) const;
    // Both work on one listing of keys/ (`files`), taken once at open: a store of N rings has N
    // client directories, and each listing opens every one of them. recover_pending() updates
    // `files` for what it renames.
    void recover_pending(std::vector<std::string>& files);
    void check_files(const std::vector<std::string>& files, bool strict);
    void commit(const std::vector<KeyRing>& rings);
    // What Writer is made of. stage() = adopt_pending(store_sealed(r, seal_ring(r))); a staged
    // ring is invisible until commit_staged(); abort_staged() drops what was staged and removes
    // its pending files (best effort: the next writer removes any that remain).
    void stage(const KeyRing& ring);
    void commit_staged();
    void abort_staged() noexcept;
    Bytes seal_ring(const KeyRing& ring);
    PendingRing store_sealed(const KeyRing& ring, const Bytes& file);
    PendingRing store_final(const KeyRing& ring, const Bytes& file);
    void adopt_pending(const PendingRing& p);
    class BulkWriter;  // fill mode (keystore_write.cpp)
    std::unique_ptr<BulkWriter> bulk_writer(const std::string& scratch_dir);

    std::unique_ptr<Storage> m_storage;
    MasterKeys m_keys;
    bool m_writable;
    std::unique_ptr<StorageLock> m_lock;
    StoreMeta m_meta;
    std::unique_ptr<Manifest> m_manifest;
    std::unique_ptr<Streamed> m_streamed;  // open_streaming: what the scan at open found
    std::unique_ptr<Manifest> m_staged;  // the next manifest while rings are being staged
    std::vector<std::string> m_staged_files;
    std::vector<VerifyProblem> m_file_problems;
};

// The version of a ring that `read` means: the given one, else the current one. Throws
// NotFoundError with a hint.
const KeyVersion& pick_version(const KeyRing& r, std::optional<std::uint32_t> version);
// A fresh key version made in the backend and wrapped under the master key.
KeyVersion make_key_version(const MasterKeys& keys, const KeyId& id, std::uint32_t number, std::int64_t now);
// Adds a new current version to a ring; the previous current one becomes deactivated.
void add_current_version(const MasterKeys& keys, KeyRing& r, std::int64_t now);
// Marks one version (or all) destroyed and drops its wrapped key. Throws NotFoundError when
// there is no such version or nothing is left to destroy.
void destroy_versions(KeyRing& r, std::optional<std::uint32_t> version, std::int64_t now);
// The readable key material of one version (unwrapped in the token, check value compared).
SecureBytes unwrap_readable(const MasterKeys& keys, const KeyId& id, const KeyVersion& v);
// Unwraps every live version of a ring in the token and compares check values; problems go
// into the report.
void check_ring_keys(const MasterKeys& keys, const KeyRing& r, VerifyReport& rep);

// Seconds since the epoch <-> "2026-11-28T19:09:48Z".
std::string format_time(std::int64_t t);
std::int64_t now_seconds();

}  // namespace keywarden::keystore
