// SPDX-License-Identifier: Apache-2.0
// The shared part of export, verify and import: leftovers of killed runs, output checks,
// backup keys, the bundle writer, the staging directory of an import.
#include "keywarden/backup.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <sys/file.h>

#include <ctime>

#include <nlohmann/json.hpp>

#include "bundle_io.hpp"
#include "internal.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/log.hpp"
#include "keywarden/planned_keys.hpp"
#include "keywarden/token_protector.hpp"

namespace keywarden::backup {


namespace detail {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void remove_stale_leftovers(const std::string& path) {
    fs::path t = fs::absolute(path);
    const std::string prefix = "." + t.filename().string() + ".";
    std::error_code ec;
    fs::directory_iterator it(t.parent_path(), ec);
    if (ec) return;
    std::vector<std::pair<fs::path, bool>> found;  // a leftover, and whether it is a temp file
    for (const auto& e : it) {
        std::string rest = e.path().filename().string();
        if (!rest.starts_with(prefix)) continue;
        rest = rest.substr(prefix.size());
        auto dash = rest.find('-');
        if (dash == std::string::npos || rest.size() != dash + 7) continue;  // mkstemp's XXXXXX
        std::string what = rest.substr(0, dash);
        if (what == "tmp" || what == "parts" || what == "verify" || what == "import")
            found.emplace_back(e.path(), what == "tmp");
    }
    const auto now = std::time(nullptr);
    for (const auto& [p, file] : found) {
        struct stat st {};
        if (::lstat(p.c_str(), &st) != 0 || st.st_uid != ::geteuid() || now - st.st_mtime < 60) continue;
        if (file ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode)) continue;
        // Removed while holding its lock: a live run holds it, and a run cannot take it back.
        io::Fd fd(::open((file ? p : p / ".lock").c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
        if (fd.valid() && ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;  // in use
        if (!fd.valid() && file) continue;                                       // gone meanwhile
        bool removed = file ? ::unlink(p.c_str()) == 0 : (fs::remove_all(p, ec), !ec);
        fd.reset();
        if (removed) log::warn("removed " + p.string() + ", left behind by an earlier run that was killed");
    }
}

std::string canonical_target(const std::string& p) {
    fs::path a = fs::absolute(p);
    std::error_code ec;
    fs::path parent = fs::weakly_canonical(a.parent_path(), ec);
    return (parent / a.filename()).string();
}

void refuse_outputs(const std::string& bundle, const std::string& secret) {
    if (bundle.empty() || secret.empty())
        throw UsageError("both --key-bundle-file and --key-bundle-secret are needed");
    if (canonical_target(bundle) == canonical_target(secret))
        throw UsageError("the bundle and the secret must be different files",
                         "keep them apart: whoever holds both holds every key");
    for (const auto& p : {bundle, secret}) refuse_output(p);
}

void refuse_output(const std::string& path) {
    std::error_code ec;
    if (fs::exists(fs::symlink_status(path, ec)))
        throw ConflictError(path + " already exists", "choose another path; keywarden never overwrites a backup");
    if (!fs::is_directory(fs::absolute(path).parent_path(), ec))
        throw UsageError("the directory for " + path + " does not exist");
}

// A readable AES or HMAC session key made in the token: the backup keys. Extractable only
// because their values must go into the secret file, and never a token object.
pkcs11::SessionObject make_backup_key(pkcs11::Session& s, bool encryption) {
    pkcs11::Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY);
    t.add_ulong(CKA_KEY_TYPE, encryption ? CKK_AES : CKK_GENERIC_SECRET);
    t.add_ulong(CKA_VALUE_LEN, 32).add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.add_bool(CKA_SENSITIVE, false).add_bool(CKA_EXTRACTABLE, true);
    if (encryption) t.add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true);
    else t.add_bool(CKA_SIGN, true).add_bool(CKA_VERIFY, true);
    return s.generate_key(encryption ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN, t);
}

// The backup encryption key from its value, as a session object that can unwrap (import,
// verify) or wrap (export workers).
pkcs11::SessionObject load_backup_key(pkcs11::Session& s, const SecureBytes& value, bool wrap) {
    pkcs11::Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_AES);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
    t.add_bool(CKA_EXTRACTABLE, false).add_bool(CKA_UNWRAP, !wrap).add_bool(CKA_WRAP, wrap);
    t.add_bytes(CKA_VALUE, value);
    return s.create_object(t);
}



// The entries of `count` rings, in order, each from ring_at(i). Each key is unwrapped under the
// master key into a sensitive session object, wrapped under the backup key and destroyed: never in
// host memory in the clear.
void export_entries(const std::function<KeyRing(std::size_t)>& ring_at, std::size_t count, bool read_ahead,
                    keystore::MasterKeys& master, TokenBackupKey& backup, const SecureBytes& meta_key,
                    bool private_keys, const std::function<void(const std::string&, bool)>& emit,
                    pkcs11::TokenRecycler* recycler) {
    // Reading and parsing ring files is host work that needs no token: with read_ahead a second
    // thread does it ahead of the token work (SoftHSM serialises token calls, but the host has a
    // second core). Only when ring_at makes no token call: a PKCS#11 session is for one thread.
    struct Slot {
        KeyRing ring;
        std::vector<Bytes> sealed;  // each version's encrypted metadata, made ahead too
    };
    std::size_t next = 0;
    MetaCipher meta_cipher(meta_key);  // used by the reading thread only
    ReadAhead<Slot> ahead(
        [&]() -> std::optional<Slot> {
            if (next == count) return std::nullopt;
            Slot slot;
            slot.ring = ring_at(next++);
            const KeyRing& r = slot.ring;
            for (const auto& v : r.versions) {
                EntryMeta m{r.id.str(), v.version, v.state, v.created, v.valid_from, v.valid_until,
                            r.current && *r.current == v.version, v.key_type, v.key_length, v.kcv,
                            v.public_key, private_keys && !v.wrapped.empty()};
                slot.sealed.push_back(seal_metadata(meta_cipher, m));
            }
            return slot;
        },
        read_ahead);

    for (std::size_t n = 0; n < count; ++n) {
        auto got = ahead.next();
        if (!got) throw Error("internal: fewer rings than expected");
        Slot& slot = *got;
        const KeyRing& r = slot.ring;
        std::size_t made = 0;
        for (std::size_t i = 0; i < r.versions.size(); ++i) {
            const auto& v = r.versions[i];
            EntryLine el;
            el.sealed_meta = std::move(slot.sealed[i]);
            bool wrapped = private_keys && !v.wrapped.empty();
            if (wrapped) {
                // Unwrapped under the master key into a sensitive session object, wrapped under
                // the backup key, destroyed: never in host memory in the clear.
                auto key = master.protector->unprotect(v.wrapped, {v.key_type, v.key_length}, Exposure::sensitive);
                el.wrapped = backup.under().protect(*key);
                ++made;
            }
            emit(encode_entry(el), wrapped);
        }
        if (recycler) recycler->made(made);
    }
}

// The wrap mechanism for bundles: RFC 5649, so that `openssl enc -id-aes256-wrap-pad` can undo it.
CK_MECHANISM_TYPE bundle_mechanism(pkcs11::Session& s) {
    for (CK_MECHANISM_TYPE m : {CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD})
        if (s.has_mechanism(m)) return m;
    throw TokenError("the token has no AES key wrap with padding (RFC 5649)",
                     "run 'keywarden token check'");
}

CK_MECHANISM_TYPE mechanism_of(const std::string& method) {
    for (CK_MECHANISM_TYPE m : {CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD})
        if (pkcs11::AesWrapProtector::method_name(m) == method) return m;
    throw FormatError("the bundle uses wrap method '" + method + "', which this keywarden does not know");
}

BundleHeader new_header(pkcs11::Session& s) {
    BundleHeader h;
    std::uint8_t bid[16];
    s.random(bid);
    h.bundle_id = to_hex(bid);
    h.created = keystore::now_seconds();
    return h;
}

void check_rfc5649(pkcs11::AesWrapProtector& under_backup, const Bytes& host_kcv, const std::string& mech_name) {
    if (!same_bytes(under_backup.key_check_value(), host_kcv))
        throw TokenError("the token's " + mech_name + " is not RFC 5649, so a bundle could not be opened with openssl",
                         "report the token model");
}

struct BundleWriter::State {
    ExclusiveFile out;
    HmacStream mac;
    State(const std::string& path, const SecureBytes& key) : out(path), mac(key) {}
};

BundleWriter::BundleWriter(const std::string& path, std::string_view magic, const BundleHeader& h,
                           const SecureBytes& signature_key)
    : m(std::make_unique<State>(path, signature_key)) {
    line(magic);
    line(encode_header(h));
}

BundleWriter::~BundleWriter() = default;

void BundleWriter::line(std::string_view s) {
    m->out.write(s);
    m->out.write("\n");
    m->mac.update(s);
    m->mac.update("\n");
}

void BundleWriter::finish() {
    m->out.write("mac " + to_hex(m->mac.final()) + "\n");
    m->out.seal();
}

const std::string& BundleWriter::temp_path() const { return m->out.temp_path(); }

void BundleWriter::publish() { m->out.publish(); }

std::uint64_t BundleWriter::bytes() const { return m->out.bytes(); }

namespace {

// The master keys that a killed `import --init` generated for the store it was building, named in
// the store.json of its staging directory (or, if it was killed before writing that, in its record
// of planned keys: keystore::forget_planned_keys), protect nothing: that store never came to be.
// keystore::forget_generated_keys destroys those on this token.
// False when the directory is not believed (then it is left where it is, as it names keys that
// may still exist).
bool forget_killed_init(const fs::path& staging, pkcs11::TokenContext& ctx) {
    // Only a directory this user made, as mkdtemp does (0700), with a store.json of its own:
    // the keys another user's files name are not destroyed on their word.
    struct stat d {}, f {};
    const std::string meta_path = (staging / "store.json").string();
    const bool is_dir = ::lstat(staging.c_str(), &d) == 0 && S_ISDIR(d.st_mode);
    const bool has_meta = ::lstat(meta_path.c_str(), &f) == 0;
    if (!has_meta && errno == ENOENT && is_dir)
        return true;  // killed before it wrote store.json: the record of planned keys names its keys
    if (!is_dir || d.st_uid != ::geteuid() || (d.st_mode & 077) != 0 || !has_meta || !S_ISREG(f.st_mode) ||
        f.st_uid != ::geteuid()) {
        log::warn("not acting on the master keys that " + meta_path + " names, and leaving " + staging.string() +
                  ": it is not a private directory of this user with a store.json of its own; check what made "
                  "it, delete any master key it names that no store uses, then remove it");
        return false;
    }
    keystore::StoreMeta meta;
    try {
        meta = keystore::read_store_json(staging.string());  // also of an unfinished store
    } catch (const std::exception& e) {
        log::warn("not acting on " + meta_path + " (" + e.what() + "), and leaving " + staging.string() +
                  ": delete any master key it names that no store uses, then remove it");
        return false;
    }
    return keystore::forget_generated_keys(meta, ctx, "an import --init");
}

}  // namespace

StagingDir::StagingDir(const std::string& store_path, bool init, pkcs11::TokenContext* token)
    : m_path(keystore::store_directory(store_path)), m_parent(m_path.parent_path()), m_init(init) {
    std::error_code ec;
    keystore::create_private_directories(m_parent.string());
    std::string name = m_path.filename().string();
    if (init) {
        m_lock_file = (m_parent / ("." + name + ".import.lock")).string();
        m_init_lock = keystore::open_file_storage(m_parent.string())->lock_file("." + name + ".import.lock");
        keystore::refuse_existing_store(store_path);  // again, now that we hold the lock
        m_record = std::make_unique<keystore::PlannedKeysRecord>(store_path, "import");
    }
    // What killed --init imports left (records of planned keys, "-init-" staging directories) is
    // handled only under the lock such an import held: an --init holds it; a plain import (the
    // store exists, so no --init can start) takes it when it is free, without waiting.
    bool init_lock = init;
    io::Fd probe;
    if (!init) {
        probe.reset(::open((m_parent / ("." + name + ".import.lock")).c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
        init_lock = !probe.valid() ? errno == ENOENT : ::flock(probe.get(), LOCK_EX | LOCK_NB) == 0;
    }
    if (init_lock && token) keystore::forget_planned_keys(store_path, "import", *token);
    // Leftovers of an import that was killed are removed: no other import is running. Those of an
    // --init ("-init-") were new stores whose generated master keys go too. Records of planned
    // master keys ("-keys-") were handled above.
    std::vector<std::pair<fs::path, bool>> others;  // and whether it is an --init's
    for (const auto& e : fs::directory_iterator(m_parent, ec)) {
        const std::string n = e.path().filename().string();
        // Exactly mkdtemp's names: another store's ("P.import-x") or a record's temp file
        // (".P.import-keys.tmp-...") only start the same way.
        auto made_as = [&](const std::string& base) { return n.starts_with(base) && n.size() == base.size() + 6; };
        const bool of_init = made_as("." + name + ".import-init-");
        if (!of_init && !made_as("." + name + ".import-")) continue;
        if (of_init && !(init_lock && token)) continue;
        others.emplace_back(e.path(), of_init);
    }
    for (const auto& [o, of_init] : others)
        if (!of_init || forget_killed_init(o, *token)) fs::remove_all(o, ec);
    m_staging = (m_parent / ("." + name + (init ? ".import-init-XXXXXX" : ".import-XXXXXX"))).string();
    if (!::mkdtemp(m_staging.data())) io::fail("cannot create a staging directory in", m_parent.string());
}

StagingDir::~StagingDir() {
    std::error_code ec;
    // Not switched: the staging directory is the unfinished result. Switched by an exchange: it
    // holds the previous store.
    if (!m_switched || !m_init) fs::remove_all(m_staging, ec);
}

void StagingDir::make_room_for_init() { ::rmdir(m_staging.c_str()); }

void StagingDir::record_planned_keys(keystore::InitParams& p) { m_record->attach(p); }

void StagingDir::clone_live_store() {
    ::chmod(m_staging.c_str(), 0700);
    hardlink_clone(m_path, m_staging);
}

void StagingDir::switch_in() {
    if (m_init) {
        if (::rename(m_staging.c_str(), m_path.c_str()) != 0) io::fail("cannot move the new store to", m_path.string());
    } else if (::renameat2(AT_FDCWD, m_staging.c_str(), AT_FDCWD, m_path.c_str(), RENAME_EXCHANGE) != 0) {
        io::fail("cannot switch the imported store into", m_path.string());
    }
    m_switched = true;
    io::fsync_dir_of(m_path.string());
    // The new store exists now: an import waiting for the lock re-checks and is refused, so the
    // lock file can go (it is still held until this object is destroyed).
    if (m_init) ::unlink(m_lock_file.c_str());
}

ImportTarget open_import_target(const pkcs11::TokenOptions& tok, const std::string& path, bool init,
                                bool dry_run, int store_version) {
    ImportTarget t;
    if (init) {
        keystore::refuse_existing_store(path);
        t.token = pkcs11::open_token(tok, true);
        return t;
    }
    if (!keystore::open_file_storage(path)->exists())
        throw NotFoundError("no key store at " + path,
                            store_version == 1
                                ? "pass --init to create a v1 store (with a new master key) as part of the import, "
                                  "or create it first with 'keywarden init --store-version 1'"
                                : "pass --init to create it (with new master keys) as part of the import, or "
                                  "create it first with 'keywarden init'");
    t.store.emplace(keystore::open_any_store(tok, path, !dry_run));
    int found = t.store->store->store_version();
    if (found != store_version && store_version == 1)
        throw UsageError("the store at " + path + " is a version 2 store; a v1 backup restores into a v1 store",
                         "restore into a new v1 store (--init and another --keystore), then move its keys with "
                         "'keywarden migrate'");
    if (found != store_version)
        throw UsageError("the store at " + path + " is a version " + std::to_string(found) + " store",
                         "this command needs a version 2 store; for a v1 store use 'keywarden backup', or move "
                         "its keys into a v2 store with 'keywarden migrate'");
    t.token = t.store->token;
    return t;
}

}  // namespace detail

}  // namespace keywarden::backup
