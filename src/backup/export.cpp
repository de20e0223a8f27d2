// SPDX-License-Identifier: Apache-2.0
// export: every selected key wrapped under fresh backup keys in the token, on the token pipeline.
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

// ---- export ---------------------------------------------------------------------------------

namespace {

// What goes in: every ring, or the ones named; without private keys only keypairs.
struct Selection {
    bool all = false, private_keys = false;
    std::set<std::string> named;
    keystore::KeyStore::Counts want;
    bool wanted(const KeyId& id) const {
        return all ? private_keys || keystore::has_public(id.kind) : named.count(id.str()) != 0;
    }
};

Selection select_rings(const keystore::KeyStore& store, const ExportOptions& o) {
    Selection sel;
    sel.all = o.all;
    sel.private_keys = o.private_keys;
    keystore::KeyStore::Counts& want = sel.want;
    if (o.all) {
        for (const auto& [kind, c] : store.counts_by_kind())
            if (o.private_keys || keystore::has_public(kind)) {
                want.rings += c.rings;
                want.versions += c.versions;
            }
    } else {
        for (const auto& id : o.ids) {
            if (!store.contains(id)) throw NotFoundError("no key ring " + id.str() + " in the store");
            if (!sel.named.insert(id.str()).second) throw UsageError(id.str() + " is named twice");
        }
        // Without --private-keys a bundle holds public halves only: a named ring without one would
        // silently be left out, so it is refused.
        if (!o.private_keys)
            for (const auto& id : sel.named)
                if (!keystore::has_public(KeyId::parse(id).kind))
                    throw UsageError(id + " has no public half, and without --private-keys a bundle holds public "
                                          "halves only",
                                     "pass --private-keys to export its keys, or leave it out");
        for (const auto& id : sel.named) {
            ++want.rings;
            want.versions += store.version_count(KeyId::parse(id));  // from the manifest: no ring read twice
        }
    }
    if (!o.private_keys && want.rings == 0)
        throw UsageError("nothing to export: without --private-keys only public halves of "
                         "keypairs are exported, and none was selected");
    return sel;
}

// Fresh backup keys for this export only, made in the token. Their values go to the secret
// file; the wrapping is done by a non-extractable copy of the encryption key (made again after a
// token restart), and the generated objects are destroyed at once. The header gets their
// method and check values.
SecretFile fresh_backup_keys(pkcs11::Session& session, CK_MECHANISM_TYPE mech, BundleHeader& h) {
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
    return secret;
}

// Every selected ring's entries, one line each, to `emit` in key id order, on the token pipeline:
// each worker reads the store's rings in key id order (a forked one uses this process's open
// store, inherited by fork, on its own session), exports the chunks it takes, and skips the
// others.
void export_rings(keystore::OpenStore& os, const Selection& sel, const ExportOptions& o, const SecretFile& secret,
                  CK_MECHANISM_TYPE mech, TokenBackupKey& backup, const SecureBytes& meta_key,
                  const std::function<void(std::string_view)>& emit) {
    keystore::KeyStore& store = *os.store;
    const std::size_t rings = sel.want.rings;
    auto wanted = [&](const KeyId& id) { return sel.wanted(id); };
    // The next wanted ring from a cursor.
    auto take = [](keystore::KeyStore::RingCursor& cur) {
        auto r = cur.next();
        if (!r) throw Error("internal: the store changed during export");
        return std::move(*r);
    };
    pipeline::Plan plan;
    plan.items = rings;
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
            if (at != rings) throw Error("internal: the store changed during export");
        },
        emit);
}

}  // namespace

ExportSummary export_bundle(keystore::OpenStore& os, const ExportOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    refuse_outputs(o.bundle_path, o.secret_path);
    remove_stale_leftovers(o.bundle_path);
    remove_stale_leftovers(o.secret_path);
    // The rings are read in key id order from the manifest (streamed from disk for a large
    // store), so the bundle is always in key id order.
    const Selection sel = select_rings(*os.store, o);
    // Only until the key loop: the module may restart there, and this session with it.
    pkcs11::Session& session = *os.token.session;
    BundleHeader h = new_header(session);
    h.private_keys = o.private_keys;
    h.rings = sel.want.rings;
    h.entries = sel.want.versions;
    const CK_MECHANISM_TYPE mech = bundle_mechanism(session);
    const SecretFile secret = fresh_backup_keys(session, mech, h);
    TokenBackupKey backup(os.token, secret.encryption, mech, true);
    check_rfc5649(backup.under(), secret.kcv_encryption, secret.wrap_mechanism);
    const SecureBytes meta_key = metadata_key(secret.signature);

    ExportSummary sum;
    sum.bundle_id = h.bundle_id;
    sum.rings = sel.want.rings;
    // Both files are written and checked under temp names beside their targets, and put in place
    // only then: a failure or a kill before that leaves neither (a kill leaves temp files, which
    // the next run removes).
    BundleWriter out(o.bundle_path, kMagicLine, h, secret.signature);
    std::size_t done = 0;
    export_rings(os, sel, o, secret, mech, backup, meta_key, [&](std::string_view l) {
        out.line(l);
        ++sum.entries;
        sum.wrapped_keys += !l.ends_with(" -");
        if (o.progress) o.progress(++done, h.entries);
    });
    if (sum.entries != h.entries) throw Error("internal: the store changed during export");
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
                                            parse_secret_file(detail::read_secret_file(sf.temp_path())), os.token,
                                            nullptr, {}, o.jobs);
    detail::check_written(rep, sum.entries, sum.wrapped_keys, "bundle");
    // The secret first: a kill between the two links leaves a secret file without a bundle, which
    // holds nothing (its backup keys exist nowhere else), rather than a bundle that cannot be
    // opened.
    sf.publish();
    try {
        out.publish();
    } catch (...) {
        ::unlink(o.secret_path.c_str());
        throw;
    }
    sum.seconds = seconds_since(t0);
    return sum;
}

}  // namespace keywarden::backup
