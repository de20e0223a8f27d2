// SPDX-License-Identifier: Apache-2.0
// keywarden backup --action=export|import: the key store v1 backup.
#include "keywarden/backup_v1.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cstring>

#include "internal.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore_v1.hpp"
#include "keywarden/log.hpp"
#include "util/bytes.hpp"

namespace keywarden::backup {

using namespace detail;
using keystore::KeyId;
using keystore::KeyRing;

namespace {

// Where the backup key is shown: opened before any work, so that a missing terminal changes
// nothing; a file it created is removed again unless the key was written.
class KeyDestination {
public:
    explicit KeyDestination(const V1ExportOptions& o) {
        const std::string& spec = o.key_out;
        const std::string& backup_file = o.file;
        if (o.key_fd >= 0) {
            m_fd.reset(o.key_fd);
            m_what = o.key_fd_name.empty() ? "file descriptor " + std::to_string(o.key_fd) : o.key_fd_name;
        } else if (spec.empty()) {
            m_fd.reset(::open("/dev/tty", O_WRONLY | O_NOCTTY | O_CLOEXEC));
            if (!m_fd.valid())
                throw UsageError("there is no terminal to show the backup key on",
                                 "the key is shown once and never logged or written by default: pass "
                                 "--backup-key-out FD (an open file descriptor) or --backup-key-out PATH "
                                 "(a new file) to say where it goes");
            m_what = "/dev/tty";
        } else {
            if (canonical_target(spec) == canonical_target(backup_file))
                throw UsageError("the backup key and the backup file must be different files",
                                 "keep them apart: whoever holds both holds every key");
            m_fd.reset(::open(spec.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
            if (!m_fd.valid()) {
                if (errno == EEXIST)
                    throw ConflictError(spec + " already exists", "choose another path for --backup-key-out; "
                                                                  "nothing was overwritten");
                io::fail("cannot create", spec);
            }
            m_path = spec;
            m_what = spec;
        }
    }
    ~KeyDestination() {
        m_fd.reset();
        if (!m_path.empty() && !m_written) ::unlink(m_path.c_str());
    }
    KeyDestination(const KeyDestination&) = delete;
    KeyDestination& operator=(const KeyDestination&) = delete;

    void show(const SecureBytes& text) {
        // Straight from the wiping buffer, never through a copy.
        if (!io::write_fully(m_fd.get(), as_string_view(text))) io::fail("cannot write the backup key to", m_what);
        if (!m_path.empty() && ::fsync(m_fd.get()) != 0) io::fail("cannot sync", m_path);
        m_written = true;
    }
    const std::string& what() const { return m_what; }

private:
    io::Fd m_fd;
    bool m_written = false;
    std::string m_path, m_what;
};


using util::append;

// Shows the backup key once, from wiping buffers only; if it cannot be shown, the backup it opens
// is removed (a backup nobody can open is worse than none).
void show_backup_key(KeyDestination& dest, const SecureBytes& backup_key, const std::string& file) {
    try {
        SecureBytes text;
        append(text, "Backup master key: ");
        SecureBytes b64 = base64_secret(backup_key);
        text.insert(text.end(), b64.begin(), b64.end());
        append(text, "\n");
        dest.show(text);
    } catch (...) {
        ::unlink(file.c_str());
        throw;
    }
}

}  // namespace

// ---- export ---------------------------------------------------------------------------------

V1ExportSummary export_v1_backup(keystore::OpenAnyStore& os, const V1ExportOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    keystore::Store& store = *os.store;
    if (store.store_version() != 1)
        throw UsageError("the store at " + store.storage().describe() + " is a version " +
                             std::to_string(store.store_version()) + " store",
                         "back it up with 'keywarden export --all --private-keys --key-bundle-file F "
                         "--key-bundle-secret S'");
    if (o.file.empty()) throw UsageError("say where the backup goes: --file F");
    remove_stale_leftovers(o.file);  // the temp file of a backup that was killed
    refuse_output(o.file);
    KeyDestination dest(o);
    pkcs11::Session& session = *os.token.session;

    std::vector<KeyId> ids = store.key_ids();
    if (ids.empty()) throw UsageError("the store holds no keys: there is nothing to back up");
    BundleHeader h = new_header(session);
    h.private_keys = true;
    h.rings = ids.size();
    // Every file is read (and its MAC checked in the token) once, here: the header needs the
    // version count before the first entry. A v1 store is small enough to hold.
    std::vector<KeyRing> rings;
    rings.reserve(ids.size());
    for (const auto& id : ids) {
        rings.push_back(store.load(id));
        h.entries += rings.back().versions.size();
    }

    // The backup key: fresh, made in the token for this backup only, read once to be shown.
    CK_MECHANISM_TYPE mech = bundle_mechanism(session);
    SecureBytes backup_key;
    {
        auto k = make_backup_key(session, false);
        backup_key = session.get_secret(k.handle(), CKA_VALUE);
    }
    SecretFile secret = v1_backup_secret(backup_key);
    h.wrap_method = pkcs11::AesWrapProtector::method_name(mech);
    h.wrap_mechanism = pkcs11::mechanism_name(mech);
    h.kcv_encryption = secret.kcv_encryption;
    h.kcv_signature = secret.kcv_signature;
    TokenBackupKey backup(os.token, secret.encryption, mech, true);
    check_rfc5649(backup.under(), secret.kcv_encryption, h.wrap_mechanism);
    SecureBytes meta_key = metadata_key(secret.signature);

    V1ExportSummary sum;
    sum.bundle_id = h.bundle_id;
    sum.rings = ids.size();
    {
        // Written and checked under a temp name, put in place only then (see export_bundle).
        BundleWriter out(o.file, kV1MagicLine, h, secret.signature);
        export_entries([&](std::size_t i) { return std::move(rings[i]); }, rings.size(), true,
                       store.keys(), backup, meta_key, true, [&](const std::string& l, bool wrapped) {
            out.line(l);
            ++sum.entries;
            sum.wrapped_keys += wrapped;
            if (o.progress) o.progress(sum.entries, h.entries);
        });
        if (sum.entries != h.entries) throw Error("internal: the store changed during the backup");
        out.finish();
        sum.bytes = out.bytes();
        // Read back and verified completely; only then is it put in place and the key shown.
        auto rep = detail::verify_bundle_beside(out.temp_path(), o.file, secret, os.token, nullptr, {}, 1);
        detail::check_written(rep, sum.entries, sum.wrapped_keys, "backup");
        out.publish();
    }
    show_backup_key(dest, backup_key, o.file);
    sum.key_shown_on = dest.what();
    sum.seconds = seconds_since(t0);
    return sum;
}

// ---- import ---------------------------------------------------------------------------------

SecureBytes backup_key_from_env() {
    char* v = std::getenv("BACKUP_MASTER_KEY");
    if (!v || !*v)
        throw UsageError("BACKUP_MASTER_KEY is not set",
                         "export BACKUP_MASTER_KEY=<the key 'keywarden backup --action=export' showed>; "
                         "the backup key is read from the environment only, never from the command line");
    std::size_t n = std::strlen(v);
    SecureBytes text(v, v + n);
    // This process's copy of the variable is wiped: it would otherwise sit in memory all along.
    wipe(v, n);
    ::unsetenv("BACKUP_MASTER_KEY");
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\r')) text.pop_back();
    auto key = secret_from_base64(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()));
    if (!key)
        throw UsageError("BACKUP_MASTER_KEY is not valid base64",
                         "copy the whole key as the export showed it, after 'Backup master key: '");
    if (key->size() != 32)
        throw UsageError("BACKUP_MASTER_KEY decodes to " + std::to_string(key->size()) +
                             " bytes, but a backup key is 32 bytes",
                         "copy the whole key as the export showed it, after 'Backup master key: '");
    return std::move(*key);
}

namespace {

// Import's pass 1: the whole file verifies (MAC, counts, every entry's metadata) before anything
// is written; every key id it holds is checked against the target `store` (if there is one), and
// the import refused (a dry run only notes why) when it holds keys without --merge, or any of
// the backup's: a v1 import never overwrites.
void scan_v1_backup(detail::BundleReader& reader, const keystore::Store* store, const V1ImportOptions& o,
                    V1ImportSummary& sum) {
    while (auto e = reader.next()) {
        ++sum.entries;
        if (sum.key_ids.empty() || sum.key_ids.back() != e->meta.key_id) {
            sum.key_ids.push_back(e->meta.key_id);
            if (store && store->contains(KeyId::parse(e->meta.key_id)))
                sum.conflicts.push_back(e->meta.key_id);
        }
    }
    sum.rings = sum.key_ids.size();
    if (store) {
        std::size_t existing = store->key_ids().size();
        if (existing != 0 && !o.merge)
            sum.refused = "the target store already holds " + std::to_string(existing) + " keys";
        else if (!sum.conflicts.empty())
            sum.refused = std::to_string(sum.conflicts.size()) + " keys of the backup already exist in the store, " +
                          sum.conflicts.front() + " first";
        if (!sum.refused.empty() && !o.dry_run)
            throw ConflictError(sum.refused, sum.conflicts.empty()
                                                 ? "restore into an empty store (--init, or 'keywarden init "
                                                   "--store-version 1'), or pass --merge to add the keys "
                                                   "to this one"
                                                 : "a v1 import never overwrites a key: restore into an "
                                                   "empty store, or destroy and remove those keys first");
    }
}

}  // namespace

V1ImportSummary import_v1_backup(const pkcs11::TokenOptions& tok, const SecureBytes& backup_key,
                                 const V1ImportOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    V1ImportSummary sum;
    sum.dry_run = o.dry_run;
    if (o.file.empty()) throw UsageError("say which backup to import: --file F");
    SecretFile secret = v1_backup_secret(backup_key);
    BundleReader reader(o.file, secret);
    sum.bundle_id = reader.header().bundle_id;

    auto [ctx, target] = open_import_target(tok, o.keystore_path, o.init, o.dry_run, 1);

    scan_v1_backup(reader, target ? target->store.get() : nullptr, o, sum);
    if (o.dry_run) {
        // Every key unwrapped and checked in the destination token, as the import would.
        sum.unwrapped_in_token = detail::dry_run_unwrap(o.file, secret, ctx, sum.bundle_id, sum.entries, o.progress,
                                                        "backup", sum.refused, "restore from another backup");
        sum.seconds = seconds_since(t0);
        return sum;
    }

    // Staging: a sibling directory holding the complete result, switched in at the end.
    StagingDir staging_dir(o.keystore_path, o.init, &ctx);
    const std::string& staging = staging_dir.path();
    std::optional<keystore::StoreMeta> created;
    try {
        keystore::StoreMeta meta;
        if (o.init) {
            staging_dir.make_room_for_init();
            keystore::InitParams params = o.init_params;
            staging_dir.record_planned_keys(params);
            created = meta = keystore::init_store_v1(ctx, staging, params);
        } else {
            staging_dir.clone_live_store();
            meta = target->meta;
        }
        auto master = pkcs11::find_master_key(*ctx.session, meta.encryption.label, meta.encryption.id);
        if (!master) throw TokenError("the store's master key is not on the token");
        auto dst = keystore::KeyStoreV1::open(
            keystore::open_file_storage(staging),
            keystore::token_master_keys_v1(ctx, master->handle, keystore::mechanism_for(meta.protection)), true,
            std::make_unique<HeldElsewhere>());

        // Pass 2: the backup key goes into the destination token; every key is unwrapped there
        // and wrapped again under the destination's master key.
        TokenBackupKey backup(ctx, secret.encryption, mechanism_of(reader.header().wrap_method));
        reader.rewind();
        std::size_t done = 0;
        restore_rings(reader, {}, backup, *dst, SIZE_MAX,
                      [&](std::vector<KeyRing>& rings) {
                          for (const auto& r : rings) dst->put_ring(r);
                      },
                      [&] { if (o.progress) o.progress(++done, sum.entries); });
        dst->sync();
        dst.reset();
        staging_dir.switch_in();
    } catch (...) {
        if (!staging_dir.switched()) {
            if (created && o.init_params.master_encryption_key.empty())
                if (auto k = pkcs11::find_master_key(*ctx.session, created->encryption.label, created->encryption.id))
                    pkcs11::destroy_object(*ctx.session, k->handle);
        }
        throw;
    }
    sum.seconds = seconds_since(t0);
    return sum;
}

}  // namespace keywarden::backup
