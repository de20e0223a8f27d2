// SPDX-License-Identifier: Apache-2.0
// export, verify and import of key bundles.
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

namespace fs = std::filesystem;
using namespace detail;
using keystore::KeyId;
using keystore::KeyRing;
using keystore::KeyState;
using keystore::KeyVersion;

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
    for (const auto& p : {bundle, secret}) {
        std::error_code ec;
        if (fs::exists(fs::symlink_status(p, ec)))
            throw ConflictError(p + " already exists", "choose another path; keywarden never overwrites a backup");
        if (!fs::is_directory(fs::absolute(p).parent_path(), ec))
            throw UsageError("the directory for " + p + " does not exist");
    }
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
    if (!same(under_backup.key_check_value(), host_kcv))
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
    if (!::mkdtemp(m_staging.data())) io_fail("cannot create a staging directory in", m_parent.string());
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
        if (::rename(m_staging.c_str(), m_path.c_str()) != 0) io_fail("cannot move the new store to", m_path.string());
    } else if (::renameat2(AT_FDCWD, m_staging.c_str(), AT_FDCWD, m_path.c_str(), RENAME_EXCHANGE) != 0) {
        io_fail("cannot switch the imported store into", m_path.string());
    }
    m_switched = true;
    fsync_dir_of(m_path.string());
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

namespace {


}  // namespace

// ---- export ---------------------------------------------------------------------------------

ExportSummary export_bundle(keystore::OpenStore& os, const ExportOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    refuse_outputs(o.bundle_path, o.secret_path);
    remove_stale_leftovers(o.bundle_path);
    remove_stale_leftovers(o.secret_path);
    keystore::KeyStore& store = *os.store;
    // Only until the key loop: the module may restart there, and this session with it.
    pkcs11::Session& session = *os.token.session;

    // What goes in: every ring, or the ones named; without private keys only keypairs. The rings
    // are read in key id order from the manifest (streamed from disk for a large store), so the
    // bundle is always in key id order.
    std::set<std::string> selected;
    keystore::KeyStore::Counts want;
    if (o.all) {
        for (const auto& [kind, c] : store.counts_by_kind())
            if (o.private_keys || keystore::has_public(kind)) {
                want.rings += c.rings;
                want.versions += c.versions;
            }
    } else {
        for (const auto& id : o.ids) {
            if (!store.contains(id)) throw NotFoundError("no key ring " + id.str() + " in the store");
            if (!selected.insert(id.str()).second) throw UsageError(id.str() + " is named twice");
        }
        // Without --private-keys a bundle holds public halves only: a named ring without one would
        // silently be left out, so it is refused.
        if (!o.private_keys)
            for (const auto& id : selected)
                if (!keystore::has_public(KeyId::parse(id).kind))
                    throw UsageError(id + " has no public half, and without --private-keys a bundle holds public "
                                          "halves only",
                                     "pass --private-keys to export its keys, or leave it out");
        for (const auto& id : selected) {
            ++want.rings;
            want.versions += store.version_count(KeyId::parse(id));  // from the manifest: no ring read twice
        }
    }
    if (!o.private_keys && want.rings == 0)
        throw UsageError("nothing to export: without --private-keys only public halves of "
                         "keypairs are exported, and none was selected");
    auto wanted = [&](const KeyId& id) {
        return o.all ? o.private_keys || keystore::has_public(id.kind) : selected.count(id.str()) != 0;
    };
    BundleHeader h = new_header(session);
    h.private_keys = o.private_keys;
    h.rings = want.rings;
    h.entries = want.versions;

    // Fresh backup keys for this export only, made in the token. Their values go to the secret
    // file; the wrapping is done by a non-extractable copy of the encryption key (made again
    // after a token restart), and the generated objects are destroyed at once.
    CK_MECHANISM_TYPE mech = bundle_mechanism(session);
    SecretFile secret;
    {
        auto bek = make_backup_key(session, true);
        auto bsk = make_backup_key(session, false);
        secret.encryption = session.get_secret(bek.handle(), CKA_VALUE);
        secret.signature = session.get_secret(bsk.handle(), CKA_VALUE);
    }
    secret.bundle_id = h.bundle_id;
    secret.wrap_method = h.wrap_method = pkcs11::AesWrapProtector::method_name(mech);
    secret.wrap_mechanism = h.wrap_mechanism = pkcs11::mechanism_name(mech);
    secret.kcv_encryption = h.kcv_encryption = encryption_kcv(secret.encryption);
    secret.kcv_signature = h.kcv_signature = signature_kcv(secret.signature);
    TokenBackupKey backup(os.token, secret.encryption, mech, true);
    check_rfc5649(backup.under(), secret.kcv_encryption, secret.wrap_mechanism);
    SecureBytes meta_key = metadata_key(secret.signature);

    ExportSummary sum;
    sum.bundle_id = h.bundle_id;
    {
        // Both files are written and checked under temp names beside their targets, and put in
        // place only then: a failure or a kill before that leaves neither (a kill leaves temp
        // files, which the next run removes).
        BundleWriter out(o.bundle_path, kMagicLine, h, secret.signature);
        std::size_t done = 0;
        auto emit = [&](std::string_view l, bool wrapped) {
            out.line(l);
            ++sum.entries;
            sum.wrapped_keys += wrapped;
            if (o.progress) o.progress(++done, h.entries);
        };
        sum.rings = want.rings;
        // The next wanted ring from a cursor; after the last one the cursor must be at its end
        // (which also compares a streamed manifest with the one authenticated at open).
        auto take = [](keystore::KeyStore::RingCursor& cur) {
            auto r = cur.next();
            if (!r) throw Error("internal: the store changed during export");
            return std::move(*r);
        };
        // One job or N on the token pipeline: each worker reads the store's rings in key id order
        // (a forked one uses this process's open store, inherited by fork, on its own session),
        // exports the chunks it takes, and skips the others; the bundle gets the lines in order.
        pipeline::Plan plan;
        plan.items = want.rings;
        plan.jobs = o.jobs;
        plan.work_near = o.bundle_path;
        plan.what = "parts";
        pipeline::run(
            os.token, plan,
            [&](pipeline::Worker& w) {
                std::optional<TokenBackupKey> own;  // a forked worker's backup key, on its session
                if (w.forked()) {
                    os.token = w.token();
                    keystore::rebind_master_keys(os);
                    own.emplace(os.token, secret.encryption, mech, true);
                }
                TokenBackupKey& key = own ? *own : backup;
                pkcs11::TokenRecycler recycler(os.token, [&] {
                    keystore::rebind_master_keys(os);
                    key.rebind();
                });
                // The ring's digest is checked against the MAC-verified manifest; its own MAC again
                // in the token would double the token calls per key for no added assurance.
                auto cursor = store.rings(false, wanted);
                std::size_t at = 0;
                while (auto chunk = w.next()) {
                    for (; at < chunk->first; ++at)
                        if (!cursor.skip()) throw Error("internal: the store changed during export");
                    export_entries([&](std::size_t) { return take(cursor); }, chunk->last - chunk->first, true,
                                   store.keys(), key, meta_key, o.private_keys,
                                   [&](const std::string& l, bool) { w.emit(l); }, &recycler);
                    at = chunk->last;
                }
                // The rest belongs to other workers; the cursor must end where the store does
                // (which also compares a streamed manifest with the one authenticated at open).
                for (; cursor.skip(); ++at) {
                }
                if (at != want.rings) throw Error("internal: the store changed during export");
            },
            [&](std::string_view l) { emit(l, !l.ends_with(" -")); });
        if (sum.entries != h.entries)
            throw Error("internal: the store changed during export");
        out.finish();
        sum.bytes = out.bytes();
        // The secret file: 0600, O_EXCL.
        SecureBytes text = encode_secret_file(secret);
        ExclusiveFile sf(o.secret_path);
        sf.write_unbuffered(text.data(), text.size());
        sf.seal();
        // Self-check: the bundle read back with the secret file read back, verified completely
        // (every key unwrapped in the token) before either file is in place.
        auto rep = detail::verify_bundle_beside(out.temp_path(), o.bundle_path,
                                                parse_secret_file(detail::read_secret_file(sf.temp_path())),
                                                os.token, nullptr, {}, o.jobs);
        detail::check_written(rep, sum.entries, sum.wrapped_keys, "bundle");
        // The secret first: a kill between the two links leaves a secret file without a bundle,
        // which holds nothing (its backup keys exist nowhere else), rather than a bundle that
        // cannot be opened.
        sf.publish();
        try {
            out.publish();
        } catch (...) {
            ::unlink(o.secret_path.c_str());
            throw;
        }
    }
    sum.seconds = seconds_since(t0);
    return sum;
}

// ---- verify ---------------------------------------------------------------------------------

namespace detail {

// Unwraps one entry's key under the backup key in the token and checks its key check value
// there; the session object is destroyed on return. Returns the problem, if any.
std::optional<std::string> trial_unwrap(pkcs11::AesWrapProtector& under_backup, pkcs11::TokenKeyBackend& backend,
                                        const detail::Entry& e) {
    const auto& m = e.meta;
    try {
        auto k = under_backup.unprotect(e.wrapped, {m.key_type, m.key_length}, Exposure::sensitive);
        if (!same(backend.check_value(*k, m.public_key), m.kcv))
            throw IntegrityError("the key's check value differs from its record");
        return std::nullopt;
    } catch (const TokenError&) {
        throw;  // the token's failure, not the bundle's
    } catch (const pkcs11::Pkcs11Error&) {
        throw;  // unprotect() reports a blob that does not unwrap as an IntegrityError
    } catch (const Error& err) {
        return std::string(err.what());
    }
}

}  // namespace detail

std::size_t detail::dry_run_unwrap(const std::string& path, const SecretFile& secret, pkcs11::TokenContext& token,
                                   const std::string& bundle_id, std::size_t entries, const Progress& progress,
                                   const std::string& what, const std::string& refused, const std::string& hint) {
    VerifyReport rep = verify_bundle_beside(path, path, secret, token, nullptr, progress, 1);
    if (rep.header.bundle_id != bundle_id || rep.entries != entries)
        throw IntegrityError("the " + what + " file changed while the dry run read it",
                             "run the dry run again when nothing writes the file");
    if (rep.ok()) return rep.unwrapped;
    std::string text = "the " + what + " does not restore: " + first_problem(rep);
    if (!refused.empty()) text += "; the import would also be refused: " + refused;
    throw IntegrityError(text, hint);
}

std::string detail::first_problem(const VerifyReport& rep) {
    if (rep.problems.empty()) return "no problem";
    const auto& first = rep.problems.front();
    std::string text = first.key_id == "bundle" ? first.problem : first.key_id + ": " + first.problem;
    if (const std::size_t more = rep.problems.size() - 1)
        text += " (and " + std::to_string(more) + (more == 1 ? " more problem)" : " more problems)");
    return text;
}

void detail::check_written(const VerifyReport& rep, std::size_t entries, std::size_t wrapped, const std::string& what) {
    std::string problem;
    if (!rep.ok()) problem = first_problem(rep);
    else if (rep.entries != entries || rep.unwrapped != wrapped)
        problem = "it holds " + std::to_string(rep.entries) + " entries with " + std::to_string(rep.unwrapped) +
                  " keys, where " + std::to_string(entries) + " entries with " + std::to_string(wrapped) +
                  " keys were written";
    else return;
    const bool v1 = what == "backup";
    throw IntegrityError(
        "the " + what + " just written does not verify: " + problem,
        std::string(v1 ? "nothing was written and no backup key was shown" : "nothing was written") +
            ": the token or the disk gave back other data than the " + (v1 ? "backup" : "export") +
            " wrote, or the store holds a key whose check value differs from its record. Check the token with "
            "'keywarden token check', the store with 'keywarden keystore verify', and the disk; then run the " +
            (v1 ? "backup" : "export") + " again");
}

VerifyReport verify_bundle(const std::string& bundle_path, const std::string& secret_path,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress, std::size_t jobs) {
    // A killed export's temp copy of this secret file holds the backup keys: it goes too.
    remove_stale_leftovers(secret_path);
    return verify_bundle(bundle_path, parse_secret_file(detail::read_secret_file(secret_path)), token,
                         against, progress, jobs);
}

VerifyReport verify_bundle(const std::string& bundle_path, const SecretFile& secret,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress, std::size_t jobs) {
    remove_stale_leftovers(bundle_path);
    return detail::verify_bundle_beside(bundle_path, bundle_path, secret, token, against, progress, jobs);
}

namespace {

// An error message as one line of a worker's output.
std::string one_line(std::string s) {
    std::replace(s.begin(), s.end(), '\n', ' ');
    return s;
}

// Verify's pass 2: every wrapped key of the bundle unwrapped under the backup key in the token
// and its check value checked there, on the token pipeline. A worker reads the bundle itself
// (for the MAC) and unwraps the keys of the chunks it takes; it reports, as lines merged in entry
// order: "problem\tAT\tKEY@VERSION\tTEXT" for a key that fails, "counts\tENTRIES\tUNWRAPPED\tRINGS"
// every 256 entries and at a chunk's end, and "failed\tTEXT" when the bundle cannot be read
// further. Rings are counted by where they start (an entry with another key id than the entry
// before it), so a worker reads the entry before each of its chunks too; the sum is checked
// against the header. A token failure is the token's, not the bundle's: it is thrown, not
// reported as a problem.
void trial_unwrap_all(const std::string& bundle_path, const std::string& work_near, const SecretFile& secret,
                      CK_MECHANISM_TYPE mech, pkcs11::TokenContext& token, const Progress& progress,
                      std::size_t jobs, VerifyReport& rep) {
    pipeline::Plan plan;
    plan.items = rep.entries;
    plan.jobs = jobs;
    plan.work_near = work_near;
    plan.what = "verify";
    std::size_t entries_done = 0, rings = 0;
    bool failed = false;
    pipeline::run(
        token, plan,
        [&](pipeline::Worker& w) {
            detail::BundleReader mine(bundle_path, secret);
            TokenBackupKey backup(w.token(), secret.encryption, mech);
            pkcs11::TokenRecycler recycler(w.token(), [&] { backup.rebind(); });
            // One job reads and decrypts every entry: a second thread does that ahead of the
            // token work, handing them over in batches. A worker of N skips the entries of other
            // workers' chunks without decrypting them.
            std::optional<ReadAhead<detail::Entry>> ahead;
            if (!w.forked()) ahead.emplace([&] { return mine.next(); });
            EntryCursor cursor(mine, ahead ? std::function<std::optional<detail::Entry>()>([&] { return ahead->next(); })
                                           : nullptr);
            try {
                std::optional<std::string> previous;  // the key id of the entry before the cursor, once read
                for (bool ended = false; !ended;) {
                    auto chunk = w.next();
                    if (!chunk) break;
                    if (auto before = cursor.entry_before(chunk->first)) previous = before->meta.key_id;
                    std::size_t n = 0, unwrapped = 0, started = 0;
                    auto counts = [&] {
                        w.emit("counts\t" + std::to_string(n) + "\t" + std::to_string(unwrapped) + "\t" +
                               std::to_string(started));
                        n = unwrapped = started = 0;
                    };
                    while (cursor.position() < chunk->last) {
                        const std::size_t at = cursor.position();
                        auto e = cursor.next();
                        if (!e) {
                            ended = true;  // fewer entries than the header says: the MAC pass reports it
                            break;
                        }
                        ++n;
                        if (!previous || *previous != e->meta.key_id) ++started;
                        previous = e->meta.key_id;
                        if (!e->wrapped.empty()) {
                            if (auto problem = trial_unwrap(backup.under(), backup.backend(), *e))
                                w.emit("problem\t" + std::to_string(at) + "\t" + e->meta.key_id + "@" +
                                       std::to_string(e->meta.version) + "\t" + one_line(*problem));
                            else ++unwrapped;
                            recycler.made(1);
                        }
                        if (n == 256) counts();
                    }
                    counts();
                }
                cursor.skip_rest();
            } catch (const TokenError&) {
                throw;  // a module restart that failed
            } catch (const pkcs11::Pkcs11Error&) {
                throw;
            } catch (const Error& e) {
                w.emit("failed\t" + one_line(e.what()));
            }
        },
        [&](std::string_view line) {
            auto field = [&](std::size_t i) {
                std::size_t from = 0;
                for (; i > 0; --i) from = line.find('\t', from) + 1;
                auto to = line.find('\t', from);
                return std::string(line.substr(from, to == std::string_view::npos ? to : to - from));
            };
            if (line.starts_with("counts\t")) {
                entries_done += std::stoul(field(1));
                rep.unwrapped += std::stoul(field(2));
                rings += std::stoul(field(3));
                if (progress) progress(entries_done, rep.header.entries);
            } else if (line.starts_with("problem\t")) {
                auto from = line.find('\t', line.find('\t', 8) + 1) + 1;
                rep.problems.push_back({field(2), std::string(line.substr(from))});
            } else if (line.starts_with("failed\t")) {
                failed = true;
                rep.problems.push_back({"bundle", std::string(line.substr(7))});
            } else {
                throw Error("internal: a verify worker wrote '" + std::string(line) + "'");
            }
        });
    // A reader that fails has said why; otherwise the rings counted must be the header's.
    if (!failed && rings != rep.header.rings)
        rep.problems.push_back({"bundle", detail::counts_differ(bundle_path, rep.entries, rings, rep.header)});
}

}  // namespace

VerifyReport detail::verify_bundle_beside(const std::string& bundle_path, const std::string& work_near,
                                          const SecretFile& secret, pkcs11::TokenContext& token,
                                          const keystore::Store* against, const Progress& progress,
                                          std::size_t jobs) {
    VerifyReport rep;
    detail::BundleReader reader(bundle_path, secret);
    rep.header = reader.header();
    const CK_MECHANISM_TYPE mech = mechanism_of(rep.header.wrap_method);

    std::map<std::string, Bytes> store_kcv;  // "key id@version" -> check value, live keys only
    if (against) {
        for (const auto& id : against->key_ids()) {
            KeyRing r = against->load(id);
            for (const auto& v : r.versions)
                if (v.state != KeyState::destroyed)
                    store_kcv[id.str() + "@" + std::to_string(v.version)] = v.kcv;
        }
    }
    // Pass 1: structure, counts, the whole-file MAC and the comparison with the store. No key
    // is unwrapped before the MAC has verified.
    std::set<std::string> bundle_keys, bundle_rings;
    try {
        if (!against) {
            // Nothing to compare: the MAC alone, without decrypting a single entry.
            reader.check_mac_only();
            rep.entries = rep.header.entries;
        }
        while (auto e = against ? reader.next() : std::nullopt) {
            ++rep.entries;
            const auto& m = e->meta;
            std::string key = m.key_id + "@" + std::to_string(m.version);
            if (!against) continue;  // the sets below would grow with the bundle for nothing
            bundle_keys.insert(key);
            bundle_rings.insert(m.key_id);
            if (m.state != KeyState::destroyed) {
                auto it = store_kcv.find(key);
                if (it == store_kcv.end()) rep.extra.push_back(key);
                else if (!same(it->second, m.kcv)) rep.different.push_back(key);
            }
        }
    } catch (const Error& e) {
        rep.problems.push_back({"bundle", e.what()});
    }
    // The comparison is complete only when pass 1 read the whole bundle.
    rep.compared = against && rep.problems.empty();
    if (against && !rep.compared) {
        rep.extra.clear();
        rep.different.clear();
    }
    // Pass 2: a trial unwrap of every key in the token, on the token pipeline (one job here, or
    // worker processes that take chunks of entries as they go).
    if (rep.problems.empty()) trial_unwrap_all(bundle_path, work_near, secret, mech, token, progress, jobs, rep);
    if (rep.compared) {
        // Versions missing from rings the bundle holds are differences; rings a selective
        // export did not select are only counted.
        for (const auto& [key, kcv] : store_kcv) {
            if (bundle_keys.count(key)) continue;
            if (bundle_rings.count(key.substr(0, key.rfind('@')))) rep.missing.push_back(key);
            else ++rep.not_covered;
        }
    }
    return rep;
}

// ---- import ---------------------------------------------------------------------------------

namespace detail {

void hardlink_clone(const fs::path& from, const fs::path& to) {
    for (auto it = fs::recursive_directory_iterator(from); it != fs::recursive_directory_iterator(); ++it) {
        fs::path dst = to / fs::relative(it->path(), from);
        if (it->is_directory()) {
            if (::mkdir(dst.c_str(), 0700) != 0 && errno != EEXIST) io_fail("cannot create", dst.string());
        } else if (::link(it->path().c_str(), dst.c_str()) != 0) {
            // Ring files are never changed in place (always replaced by rename), so sharing
            // inodes between the live store and the staging copy is safe.
            io_fail("cannot link", dst.string());
        }
    }
}

// --on-conflict overwrite: the ring becomes the bundle's, plus the versions only the store holds
// (rotated after the export), as they are; if the store's current version is one of them, it stays
// current. Nothing the store held is lost, and a version number is never given to a second key.
// Pass 1 found the rings with such versions (`kept`, loaded here only) and refused the import if a
// version both hold names another key, if the bundle lacks a key the store has, or if the store's
// ring cannot be read.
void keep_store_only_versions(KeyRing& r, const keystore::Store& store,
                              const std::map<std::string, std::vector<std::uint32_t>>& kept) {
    if (!kept.count(r.id.str())) return;
    KeyRing old = store.load(r.id);
    for (auto& v : old.versions)
        if (!r.find(v.version)) {
            if (old.current == v.version) r.current = v.version;
            r.versions.push_back(std::move(v));
        }
    std::sort(r.versions.begin(), r.versions.end(),
              [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });
}

// A ring as worker processes pass it back: key id, file, digest and the manifest summary.
KeyVersion version_from(const EntryMeta& m) {
    KeyVersion v;
    v.version = m.version;
    v.state = m.state;
    v.created = m.created;
    v.valid_from = m.valid_from;
    v.valid_until = m.valid_until;
    v.key_type = m.key_type;
    v.key_length = m.key_length;
    v.kcv = m.kcv;
    v.public_key = m.public_key;
    return v;
}

// Writes sealed ring files on its own thread, in order, with `write` (which makes no token call).
class RingWriter {
public:
    using Write = std::function<void(const KeyRing&, const Bytes&)>;
    explicit RingWriter(Write write)
        : m_write(std::move(write)), m_thread([this] {
              ::pthread_setname_np(::pthread_self(), "kw-ring-writer");
              run();
          }) {}
    ~RingWriter() { stop(); }
    void push(KeyRing r, Bytes file) {
        m_batch.emplace_back(std::move(r), std::move(file));
        if (m_batch.size() >= kBatch) hand_over();
    }
    // Waits for every queued ring; rethrows a write error.
    void finish() {
        hand_over();
        stop();
        if (m_error) std::rethrow_exception(m_error);
    }

private:
    // Rings travel in batches: one hand-over (and at most one wake-up) per batch.
    static constexpr std::size_t kBatch = 64, kMaxBatches = 4;
    using Batch = std::vector<std::pair<KeyRing, Bytes>>;
    void hand_over() {
        if (m_batch.empty()) return;
        std::unique_lock lock(m_mu);
        m_cv.wait(lock, [&] { return m_queue.size() < kMaxBatches || m_error; });
        if (m_error) std::rethrow_exception(m_error);
        bool was_empty = m_queue.empty();
        m_queue.push_back(std::move(m_batch));
        m_batch = Batch();
        if (was_empty) m_cv.notify_all();
    }
    void stop() {
        {
            std::lock_guard lock(m_mu);
            if (m_stopping) return;
            m_stopping = true;
        }
        m_cv.notify_all();
        m_thread.join();
    }
    void run() {
        for (;;) {
            Batch batch;
            {
                std::unique_lock lock(m_mu);
                m_cv.wait(lock, [&] { return !m_queue.empty() || m_stopping; });
                if (m_queue.empty()) return;
                bool was_full = m_queue.size() == kMaxBatches;
                batch = std::move(m_queue.front());
                m_queue.pop_front();
                if (was_full) m_cv.notify_all();
            }
            try {
                for (auto& [ring, file] : batch) m_write(ring, file);
            } catch (...) {
                std::lock_guard lock(m_mu);
                m_error = std::current_exception();
                m_queue.clear();
                m_cv.notify_all();
                return;
            }
        }
    }
    Write m_write;
    Batch m_batch;  // the producer's, not yet handed over
    std::mutex m_mu;
    std::condition_variable m_cv;
    std::deque<Batch> m_queue;
    std::exception_ptr m_error;
    bool m_stopping = false;
    std::thread m_thread;
};

// Rebuilds rings from a bundle's entries (restore_rings, declared in internal.hpp: all the rest
// of a BundleReader, so that the MAC at the end is checked, or an import worker's chunk through
// an EntryCursor), each key unwrapped under the backup key and wrapped again under the
// destination's master key inside the token; `sink` receives the finished rings in order.
//
// Keys go through the token in batches of up to token_batch(): all unwrapped, then all checked,
// then all wrapped, then all destroyed. On SoftHSM that is a few per cent faster than one key at a
// time, and with --jobs (where a worker also writes files) much more: each kind of work keeps the
// host's caches warm for a while. Finished rings are handed over at least kSinkBatch at a time
// for the same reason (the sink signs them in the token and writes them). Within a batch, a key
// that does not unwrap is reported before an earlier key whose check value differs (import has
// checked the bundle's MAC before: either means a bundle made with its secret, or a token fault).
namespace {

// restore_rings with the entries from `next`; `put_back` (may be empty) gets the entry that
// ended the last ring when fewer than all entries are wanted.
void restore_from(const std::function<std::optional<Entry>()>& next, const std::function<void(Entry&&)>& put_back,
                  bool read_ahead, const std::set<std::string>& skip, TokenBackupKey& backup, keystore::Store& dst,
                  std::size_t count, const std::function<void(std::vector<KeyRing>&)>& sink,
                  const std::function<void()>& tick, pkcs11::TokenRecycler* recycler) {
    constexpr std::size_t kSinkBatch = 64;
    const std::size_t batch = pkcs11::token_batch();
    // A key waiting for the token: which version of which held ring, and its blob.
    struct Waiting {
        std::size_t ring, version;
        Bytes blob;
    };
    std::vector<KeyRing> held;      // complete rings whose keys are still (partly) waiting
    std::vector<Waiting> waiting;   // their keys, in bundle order
    std::vector<KeyRing> finished;  // rewrapped, for the sink
    auto rewrap = [&] {
        // At most `batch` temporary objects at once, even when one ring has more versions.
        for (std::size_t first = 0; first < waiting.size(); first += batch) {
            const std::size_t last = std::min(waiting.size(), first + batch);
            std::vector<std::unique_ptr<TransientKey>> keys;
            keys.reserve(last - first);
            for (std::size_t i = first; i < last; ++i) {
                const auto& v = held[waiting[i].ring].versions[waiting[i].version];
                keys.push_back(
                    backup.under().unprotect(waiting[i].blob, {v.key_type, v.key_length}, Exposure::sensitive));
            }
            for (std::size_t i = first; i < last; ++i) {
                const auto& r = held[waiting[i].ring];
                const auto& v = r.versions[waiting[i].version];
                if (!same(backup.backend().check_value(*keys[i - first], v.public_key), v.kcv))
                    throw IntegrityError(r.id.str() + " version " + std::to_string(v.version) +
                                         ": the key's check value differs from its record");
            }
            for (std::size_t i = first; i < last; ++i)
                held[waiting[i].ring].versions[waiting[i].version].wrapped =
                    dst.keys().protector->protect(*keys[i - first]);
        }  // the temporary objects are destroyed at the end of each round
        std::size_t made = waiting.size();
        waiting.clear();
        for (auto& r : held) finished.push_back(std::move(r));
        held.clear();
        // Nothing of the token is held here, so it may restart.
        if (recycler) recycler->made(made);
        if (finished.size() >= kSinkBatch) {
            sink(finished);
            finished.clear();
        }
    };
    // (A plain KeyRing and a flag: g++ 12 warns falsely on std::optional<KeyRing> here.)
    KeyRing ring;
    std::vector<std::pair<std::size_t, Bytes>> ring_blobs;  // the open ring's keys: version index, blob
    bool open = false, wanted = false;
    auto flush = [&] {
        if (open && wanted) {
            for (auto& [i, blob] : ring_blobs) waiting.push_back({held.size(), i, std::move(blob)});
            held.push_back(std::move(ring));
            // (Rings without keys to rewrap, such as public halves, are bounded too.)
            if (waiting.size() >= batch || held.size() >= kSinkBatch) rewrap();
        }
        ring_blobs.clear();
        open = false;
    };
    // With read_ahead, the entries are read on a second thread (the whole rest of the bundle).
    // A worker's chunk is read here: the rings that start within its first `count` entries
    // (the last one may run past them; the entry that starts the next ring is read and put back).
    ReadAhead<Entry> ahead(next, read_ahead);
    for (std::size_t n = 0;; ++n) {
        auto e = ahead.next();
        if (!e) break;
        const auto& m = e->meta;
        if (!open || ring.id.str() != m.key_id) {
            if (n >= count) {
                if (put_back) put_back(std::move(*e));
                break;
            }
            flush();
            ring = KeyRing{};
            ring.id = KeyId::parse(m.key_id);
            open = true;
            wanted = !skip.count(m.key_id);
        }
        if (wanted) {
            KeyVersion v = version_from(m);
            v.protection = dst.keys().protector->method();
            if (!e->wrapped.empty()) ring_blobs.emplace_back(ring.versions.size(), std::move(e->wrapped));
            if (m.current) ring.current = m.version;
            ring.versions.push_back(std::move(v));
        }
        tick();
    }
    flush();
    rewrap();
    if (!finished.empty()) sink(finished);
}

}  // namespace

void restore_rings(detail::BundleReader& reader, const std::set<std::string>& skip, TokenBackupKey& backup,
                   keystore::Store& dst, std::size_t count,
                   const std::function<void(std::vector<KeyRing>&)>& sink, const std::function<void()>& tick,
                   pkcs11::TokenRecycler* recycler) {
    restore_from([&] { return reader.next(); }, {}, count == SIZE_MAX, skip, backup, dst, count, sink, tick,
                 recycler);
}

std::optional<Entry> EntryCursor::next() {
    std::optional<Entry> e = std::move(m_back);
    m_back.reset();
    if (!e) e = m_source ? m_source() : m_reader.next();
    if (e) ++m_at;
    return e;
}

void EntryCursor::put_back(Entry e) {
    if (m_back || m_at == 0) throw Error("internal: only the entry just read can be put back");
    m_back = std::move(e);
    --m_at;
}

void EntryCursor::skip_to(std::size_t i) {
    if (i < m_at) throw Error("internal: a bundle cursor only moves forward");
    if (i == m_at) return;
    if (m_back) {
        m_back.reset();
        ++m_at;
    }
    for (; m_at < i; ++m_at)
        if (!(m_source ? m_source().has_value() : m_reader.skip_next()))
            throw IntegrityError("the bundle has fewer entries than its header says");
}

std::optional<Entry> EntryCursor::entry_before(std::size_t first) {
    if (m_at >= first) return std::nullopt;
    skip_to(first - 1);
    auto e = next();
    if (!e) throw IntegrityError("the bundle has fewer entries than its header says");
    return e;
}

void EntryCursor::skip_rest() {
    m_back.reset();
    while (m_source ? m_source().has_value() : m_reader.skip_next()) {
    }
}

void restore_rings(EntryCursor& cursor, const std::set<std::string>& skip, TokenBackupKey& backup,
                   keystore::Store& dst, std::size_t last,
                   const std::function<void(std::vector<KeyRing>&)>& sink, pkcs11::TokenRecycler* recycler) {
    if (last <= cursor.position()) return;
    restore_from([&] { return cursor.next(); }, [&](Entry&& e) { cursor.put_back(std::move(e)); }, false, skip,
                 backup, dst, last - cursor.position(), sink, [] {}, recycler);
}

}  // namespace detail

ImportSummary import_bundle(const pkcs11::TokenOptions& tok, const ImportOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    ImportSummary sum;
    sum.dry_run = o.dry_run;
    SecretFile secret = parse_secret_file(detail::read_secret_file(o.secret_path));
    if (!o.dry_run) {
        remove_stale_leftovers(o.bundle_path);
        remove_stale_leftovers(o.secret_path);  // a killed export's temp copy holds the backup keys
    }
    detail::BundleReader reader(o.bundle_path, secret);
    sum.bundle_id = reader.header().bundle_id;

    auto [ctx, target] = open_import_target(tok, o.keystore_path, o.init, o.dry_run, 2);

    // Pass 1: the whole bundle verifies before anything is written. Only conflicts are kept in
    // memory.
    // Into a store that --init creates there is nothing to conflict with: pass 1 checks only the
    // whole-file MAC (the signed header holds the counts), and pass 2 decrypts each entry once.
    // Anything wrong in an entry then stops pass 2, before the switch.
    bool mac_only = o.init && !o.dry_run;
    const bool overwrite = o.merge && o.on_conflict == OnConflict::overwrite;
    if (mac_only) {
        reader.check_mac_only();
        sum.rings = reader.header().rings;
        sum.entries = reader.header().entries;
    } else {
        std::string last;
        // The versions of an overwritten ring: check value, and whether the bundle has the key.
        std::map<std::uint32_t, std::pair<Bytes, bool>> in_bundle;
        auto ring_done = [&] {
            if (!overwrite || !target || sum.conflicts.empty() || sum.conflicts.back() != last) return;
            KeyRing old;
            try {
                old = target->store->load(KeyId::parse(last));
            } catch (const IntegrityError& e) {
                // What it holds cannot be known: replacing it could lose versions.
                log::warn("the store's key ring " + last + " cannot be read: " + e.what());
                sum.replaced.push_back(last);
                return;
            }
            for (const auto& v : old.versions) {
                auto b = in_bundle.find(v.version);
                if (b == in_bundle.end()) sum.kept[last].push_back(v.version);
                // Another key under the same number, or a key of the store that the bundle does not
                // hold (public only, or destroyed there): it would be lost. A version destroyed in
                // the store holds nothing to lose.
                else if (v.state != KeyState::destroyed &&
                         (!same(b->second.first, v.kcv) || (!v.wrapped.empty() && !b->second.second)))
                    sum.replaced.push_back(last + "@" + std::to_string(v.version));
            }
        };
        while (auto e = reader.next()) {
            if (e->meta.key_id != last) {
                ring_done();
                in_bundle.clear();
                last = e->meta.key_id;
                ++sum.rings;
                bool conflict = target && target->store->contains(KeyId::parse(last));
                if (conflict) sum.conflicts.push_back(last);
                bool skipped = conflict && (o.on_conflict == OnConflict::skip || !o.merge);
                if (skipped) sum.skipped.push_back(last);
                if (o.dry_run && !skipped) sum.imported.push_back(last);
            }
            if (overwrite) in_bundle[e->meta.version] = {e->meta.kcv, e->meta.wrapped};
            ++sum.entries;
            if (e->meta.wrapped) ++sum.wrapped_keys;
        }
        ring_done();
    }
    std::set<std::string> skip(sum.skipped.begin(), sum.skipped.end());
    if (target) {
        std::size_t existing = target->store->key_ids().size();
        if (existing != 0 && !o.merge)
            sum.refused = "the target store already holds " + std::to_string(existing) + " key rings";
        else if (o.merge && o.on_conflict == OnConflict::abort && !sum.conflicts.empty())
            sum.refused = std::to_string(sum.conflicts.size()) +
                          " key rings of the bundle already exist in the store, " + sum.conflicts.front() +
                          " first";
        sum.refused_hint = sum.conflicts.empty() || !o.merge
                               ? "import into an empty store (keywarden init, or import --init), or pass --merge "
                                 "--on-conflict abort|skip|overwrite"
                               : "choose --on-conflict skip or overwrite";
        if (sum.refused.empty() && !sum.replaced.empty()) {
            sum.refused = std::to_string(sum.replaced.size()) +
                          " of the store's key versions or rings would be lost: the bundle holds another key under the same "
                          "version (their check values differ), or not the key the store has (public only, or "
                          "destroyed in the bundle), or the store's ring cannot be read; " +
                          sum.replaced.front() + " first. Overwrite never loses a key";
            sum.refused_hint = "keep the store's keys with --on-conflict skip; to replace a version, destroy it in "
                               "the store first (keywarden destroy KEY-ID --version N); a ring that cannot be read "
                               "is named by 'keywarden keystore verify'";
        }
        if (!sum.refused.empty() && !o.dry_run) throw ConflictError(sum.refused, sum.refused_hint);
    }
    if (o.dry_run) {
        // A drill on the destination token: every key is unwrapped there under the backup key and
        // its check value checked, as the import would do before rewrapping it (and as `verify`
        // does), the keys of skipped rings too.
        sum.unwrapped_in_token = detail::dry_run_unwrap(
            o.bundle_path, secret, ctx, sum.bundle_id, sum.entries, o.progress, "bundle", sum.refused,
            "'keywarden --token TOKEN verify --key-bundle-file F --key-bundle-secret S' lists every problem; "
            "restore from another backup");
        sum.seconds = seconds_since(t0);
        return sum;
    }

    // Staging: a sibling directory holding the complete result, switched in at the end.
    StagingDir staging_dir(o.keystore_path, o.init, &ctx);
    const std::string& staging = staging_dir.path();
    std::optional<keystore::StoreMeta> created_meta;  // master keys made by --init
    try {
        std::optional<keystore::OpenStore> stage;
        if (o.init) {
            staging_dir.make_room_for_init();
            keystore::InitParams params = o.init_params;
            staging_dir.record_planned_keys(params);
            created_meta = keystore::init_store(ctx, staging, params);
            stage.emplace(keystore::open_store_on(ctx, keystore::open_file_storage(staging), true));
        } else {
            staging_dir.clone_live_store();
            stage.emplace(keystore::open_store_on(ctx, keystore::open_file_storage(staging), true, true,
                                                  std::make_unique<HeldElsewhere>()));
        }
        keystore::KeyStore& dst = *stage->store;

        // Pass 2: the backup key goes into the destination token; every key is unwrapped there
        // and wrapped again under the destination master key. With jobs, worker processes take
        // chunks of entries as they go and write the rings as files; this process adopts them.
        const CK_MECHANISM_TYPE mech = mechanism_of(reader.header().wrap_method);
        if (o.jobs <= 1 || sum.rings < 2) {
            TokenBackupKey backup(ctx, secret.encryption, mech);
            // A restart leaves the staged store's master keys and the backup key to be found
            // or made again on the new session (ctx is the context every later step uses).
            pkcs11::TokenRecycler recycler(ctx, [&] {
                stage->token = ctx;
                keystore::rebind_master_keys(*stage);
                backup.rebind();
            });
            reader.rewind();
            std::size_t done = 0;
            // Token work here; writing the ring files on a second thread (no token calls). Into
            // a store that --init created, rings and manifest are streamed to disk (memory does
            // not grow with the bundle); otherwise they are staged as pending files.
            std::unique_ptr<keystore::KeyStore::BulkWriter> bulk;
            if (o.init) bulk = dst.bulk_writer(staging_dir.parent());
            std::vector<keystore::KeyStore::PendingRing> pending;
            RingWriter writer([&](const KeyRing& r, const Bytes& file) {
                if (bulk) bulk->add(r, file);
                else pending.push_back(dst.store_sealed(r, file));
            });
            std::size_t wrapped = 0;
            restore_rings(reader, skip, backup, dst, SIZE_MAX,
                          [&](std::vector<KeyRing>& rings) {
                              for (auto& r : rings) {
                                  ++sum.rings_written;
                                  sum.entries_written += r.versions.size();
                                  for (const auto& v : r.versions) wrapped += !v.wrapped.empty();
                                  if (overwrite) keep_store_only_versions(r, dst, sum.kept);
                                  Bytes file = dst.seal_ring(r);
                                  writer.push(std::move(r), std::move(file));
                              }
                          },
                          [&] { if (o.progress) o.progress(++done, sum.entries); }, &recycler);
            if (reader.next()) throw IntegrityError("internal: entries left after the last ring");
            if (mac_only) sum.wrapped_keys = wrapped;
            if (mac_only && (sum.entries_written != sum.entries || sum.rings_written != sum.rings))
                throw IntegrityError("the bundle holds other counts than its header says");
            writer.finish();
            if (bulk) bulk->commit();
            for (const auto& p : pending) dst.adopt_pending(p);
        } else {
            TempDir results(o.bundle_path, "import");
            // Workers take chunks of entries as they go (a worker on a slower core takes fewer):
            // a chunk is the rings that start within its entries, so a worker reads the entry
            // before a chunk to know the ring it must leave to the chunk before. Into a store
            // that --init created, workers write ring files under their final names and this
            // process writes the manifest from their lines (BulkWriter), chunk by chunk while
            // they run.
            std::string staging_root = staging;
            const std::size_t entries = sum.entries;
            std::unique_ptr<keystore::KeyStore::BulkWriter> bulk;
            if (o.init) bulk = dst.bulk_writer(staging_dir.parent());
            std::size_t wrapped = 0;
            pipeline::SharedWork work(entries, o.jobs);
            auto part_name = [&](std::size_t k) { return results.path() + "/" + std::to_string(k); };
            ChunkLines chunks(work, part_name);
            std::size_t taken = 0;  // chunks taken in
            auto take_in = [&](std::size_t i) {
                chunks.read(i, [&](std::string_view text) {
                    if (text.starts_with("wrapped ")) {
                        wrapped += std::stoull(std::string(text.substr(8)));
                        return;
                    }
                    std::string l(text);
                    auto p = keystore::KeyStore::pending_from_text(l);
                    ++sum.rings_written;
                    sum.entries_written += p.summary.versions.size();
                    if (bulk) bulk->add_written(p, std::move(l));
                    else dst.adopt_pending(p);
                });
                if (o.progress) o.progress(std::min(sum.entries_written, sum.entries), sum.entries);
            };
            pipeline::run_in_processes(
                ctx, o.jobs,
                [&](std::size_t k, pkcs11::TokenContext& c) {
                    pipeline::SharedWork::StopOnError stop_on_error(work);
                    // Not strict: the other workers' ring files are not in its manifest yet.
                    auto mine = keystore::open_store_on(c, keystore::open_file_storage(staging_root), false, false,
                                                        std::make_unique<HeldElsewhere>());
                    TokenBackupKey backup(mine.token, secret.encryption, mech);
                    pkcs11::TokenRecycler recycler(mine.token, [&] {
                        keystore::rebind_master_keys(mine);
                        backup.rebind();
                    });
                    detail::BundleReader own(o.bundle_path, secret);
                    EntryCursor cursor(own);
                    PartFile out(part_name(k));
                    std::vector<Bytes> files;
                    while (auto chunk = work.claim()) {
                        std::set<std::string> not_mine = skip;
                        // The entry before the chunk names a ring that started before it.
                        if (auto before = cursor.entry_before(chunk->first)) not_mine.insert(before->meta.key_id);
                        // Otherwise the entry at the cursor was put back as the start of a ring
                        // (at the chunk's first entry, or past it if this worker's last ring ran
                        // into the chunk).
                        std::uint64_t start = out.bytes();
                        std::size_t wrapped_here = 0;
                        restore_rings(cursor, not_mine, backup, *mine.store, chunk->last,
                                      [&](std::vector<KeyRing>& rings) {
                                          // All signed, then all written: a run of one kind of
                                          // work is faster on a busy host than alternating.
                                          files.clear();
                                          for (auto& r : rings) {
                                              for (const auto& v : r.versions) wrapped_here += !v.wrapped.empty();
                                              if (overwrite) keep_store_only_versions(r, *mine.store, sum.kept);
                                              files.push_back(mine.store->seal_ring(r));
                                          }
                                          for (std::size_t i = 0; i < rings.size(); ++i) {
                                              const KeyRing& r = rings[i];
                                              auto p = o.init ? mine.store->store_final(r, files[i])
                                                              : mine.store->store_sealed(r, files[i]);
                                              out.write(keystore::KeyStore::pending_text(p));
                                              out.write("\n");
                                          }
                                      },
                                      &recycler);
                        out.write("wrapped " + std::to_string(wrapped_here) + "\n");
                        out.flush();
                        work.record(chunk->index, k, start, out.bytes() - start);
                    }
                    cursor.skip_rest();
                },
                // Into a new store, the chunks go into the manifest as they are done. A merge
                // adopts them only when every worker is done.
                [&](const std::function<bool()>& running) {
                    pipeline::SharedWork::StopOnError stop_on_error(work);
                    if (bulk)
                        for (; taken < work.chunks() && chunks.wait(taken, running); ++taken) take_in(taken);
                });
            for (; taken < work.chunks(); ++taken) take_in(taken);
            sum.entries_written -= sum.kept_count();  // the workers' summaries include the kept versions
            if (mac_only) sum.wrapped_keys = wrapped;
            if (mac_only && (sum.entries_written != sum.entries || sum.rings_written != sum.rings))
                throw IntegrityError("the bundle holds other counts than its header says");
            if (bulk) bulk->commit();
            if (o.progress) o.progress(sum.entries, sum.entries);
        }
        dst.commit_staged();
        stage.reset();

        // The switch: one atomic rename.
        staging_dir.switch_in();
    } catch (...) {
        if (!staging_dir.switched()) {
            // The master keys --init generated belong to a store that never came to be. Best
            // effort, never hiding the error that got us here: after a failed module restart
            // there is no live session to remove them with.
            if (created_meta && o.init_params.master_encryption_key.empty() &&
                o.init_params.master_signature_key.empty())
                for (const auto* r : {&created_meta->encryption, &created_meta->signature}) {
                    try {
                        if (!ctx.session || !ctx.session->live()) throw Error("no live session");
                        if (auto k = pkcs11::find_master_key(*ctx.session, r->label, r->id))
                            pkcs11::destroy_object(*ctx.session, k->handle);
                    } catch (const std::exception&) {
                        log::warn("could not remove the new master key '" + r->label +
                                  "' from the token; remove it by hand (it protects nothing)");
                    }
                }
        }
        throw;
    }
    sum.seconds = seconds_since(t0);
    return sum;
}

}  // namespace keywarden::backup
