// SPDX-License-Identifier: Apache-2.0
// keywarden migrate: a v1 store into a v2 store.
#include "keywarden/migrate.hpp"

#include <set>

#include "internal.hpp"
#include "keywarden/error.hpp"
#include "keywarden/log.hpp"

namespace keywarden::backup {

using namespace detail;
using keystore::KeyId;
using keystore::KeyRing;

namespace {

// Same versions, states and keys (by check value): the ring was migrated before.
bool same_ring(const KeyRing& a, const KeyRing& b) {
    if (a.current != b.current || a.versions.size() != b.versions.size()) return false;
    for (std::size_t i = 0; i < a.versions.size(); ++i) {
        const auto &x = a.versions[i], &y = b.versions[i];
        if (x.version != y.version || x.state != y.state || !same_bytes(x.kcv, y.kcv) ||
            x.wrapped.empty() != y.wrapped.empty())
            return false;
    }
    return true;
}

// The destination token: the source's session when both stores live on one token; else a
// second token of the same module (one module is initialised once per process), or of another.
pkcs11::TokenContext destination_token(const MigrateOptions& o, const keystore::OpenAnyStore& src,
                                       const keystore::StoreMeta& dmeta, bool& same_token) {
    pkcs11::TokenOptions dt = o.dst_token;
    if (dt.token.empty()) dt.token = "serial:" + dmeta.token_serial;
    if (dt.pin_source.empty()) dt.pin_source = o.src_token.pin_source;
    bool same_module = dt.module.empty() || dt.module == o.src_token.module || dt.module == src.token.module->path();
    pkcs11::TokenContext dctx;
    if (same_module && dmeta.token_serial == src.token.token.serial &&
        (o.dst_token.token.empty() || o.dst_token.token == "serial:" + dmeta.token_serial)) {
        dctx = src.token;
        same_token = true;
    } else if (same_module) {
        dctx = pkcs11::open_token_on(src.token.module, dt, true);
    } else {
        dctx = pkcs11::open_token(dt, true);
    }
    return dctx;
}

// What moves: rings already there with the same keys are skipped; the same id with other keys
// is refused; rings of the destination that the source does not have are counted (they need
// --force). Every source ring is read and authenticated here, before anything is written; the
// rings to move are kept from here (each v1 file's MAC is checked in the token once).
std::vector<KeyRing> plan_migration(const keystore::Store& from, const keystore::Store& to, MigrateSummary& sum) {
    std::vector<KeyId> ids = from.key_ids();
    std::set<std::string> in_src;
    std::vector<std::string> conflicts;
    std::vector<KeyRing> moving;
    for (const auto& id : ids) {
        in_src.insert(id.str());
        KeyRing r = from.load(id);
        if (!to.contains(id)) {
            sum.to_move.push_back(id.str());
            sum.versions += r.versions.size();
            moving.push_back(std::move(r));
            continue;
        }
        if (same_ring(r, to.load(id))) sum.already_present.push_back(id.str());
        else conflicts.push_back(id.str());
    }
    for (const auto& id : to.key_ids())
        if (!in_src.count(id.str())) sum.others.push_back(id.str());
    if (!conflicts.empty())
        throw ConflictError(std::to_string(conflicts.size()) +
                                " key rings exist in both stores with different keys, " + conflicts.front() + " first",
                            "nothing was changed; migrate into a new v2 store (keywarden init), or look at both "
                            "with 'keywarden list --rotated'");
    return moving;
}

// Moves the planned rings into `to`, all or none: each key unwrapped in the source token, carried
// to the destination token under a one-time transport key (when they differ), checked by its
// check value there and wrapped under the destination's master key; one commit at the end.
void move_rings(std::vector<KeyRing>& moving, keystore::OpenAnyStore& src, pkcs11::TokenContext& dctx,
                keystore::KeyStore& to_store, const MigrateOptions& o, MigrateSummary& sum) {
    // Across two tokens the keys travel wrapped under a one-time transport key, made in the
    // source token and loaded into the destination as a session object on both sides.
    std::optional<pkcs11::SessionObject> t_src, t_dst;
    std::optional<pkcs11::AesWrapProtector> to_transport, from_transport;
    if (!sum.same_token) {
        CK_MECHANISM_TYPE mech = bundle_mechanism(*src.token.session);
        if (!dctx.session->has_mechanism(mech))
            throw TokenError("the destination token lacks " + pkcs11::mechanism_name(mech) +
                             ", which carries the keys between the two tokens");
        t_src.emplace(make_backup_key(*src.token.session, true));
        SecureBytes value = src.token.session->get_secret(t_src->handle(), CKA_VALUE);
        t_dst.emplace(load_backup_key(*dctx.session, value));
        to_transport.emplace(src.token.session, t_src->handle(), mech);
        from_transport.emplace(dctx.session, t_dst->handle(), mech);
    }
    keystore::Store& from = *src.store;
    keystore::KeyStore& to = to_store;
    std::size_t done = 0;
    // A failure below leaves no pending file behind in the destination: the writer removes them
    // unless it commits.
    auto writer = to.writer(keystore::KeyStore::Writer::Mode::update);
    for (KeyRing& r : moving) {
        const std::string idstr = r.id.str();
        for (auto& v : r.versions) {
            v.protection = to.keys().protector->method();
            if (v.wrapped.empty()) continue;
            KeySpec spec{v.key_type, v.key_length};
            auto k = from.keys().protector->unprotect(v.wrapped, spec, Exposure::sensitive);
            if (!sum.same_token) k = from_transport->unprotect(to_transport->protect(*k), spec, Exposure::sensitive);
            if (!same_bytes(to.keys().backend->check_value(*k, v.public_key), v.kcv))
                throw IntegrityError(idstr + " version " + std::to_string(v.version) +
                                     ": the key's check value differs from its record");
            v.wrapped = to.keys().protector->protect(*k);
        }
        writer->put(r);
        if (o.progress) o.progress(++done, sum.to_move.size());
    }
    // The commit point: one signed manifest names every migrated ring, or none.
    writer->commit();
}

}  // namespace

MigrateSummary migrate_v1_to_v2(const MigrateOptions& o) {
    auto t0 = std::chrono::steady_clock::now();
    MigrateSummary sum;
    sum.dry_run = o.dry_run;
    if (o.src_path.empty() || o.dst_path.empty())
        throw UsageError("both --src-keystore and --dst-keystore are needed");
    if (canonical_target(o.src_path) == canonical_target(o.dst_path))
        throw UsageError("the source and the destination are the same directory",
                         "migrate into a new v2 store: keywarden init --keystore DIR, then --dst-keystore DIR");

    auto src = keystore::open_any_store(o.src_token, o.src_path, false);
    if (src.store->store_version() != 1)
        throw UsageError("the source store at " + o.src_path + " is a version " +
                             std::to_string(src.store->store_version()) + " store",
                         "migrate moves a v1 store into a v2 store");

    auto dst_storage = keystore::open_file_storage(o.dst_path);
    if (!dst_storage->exists() || !keystore::detect_store_version(*dst_storage))
        throw NotFoundError("no key store at " + o.dst_path,
                            "create the v2 store first: keywarden init --keystore " + o.dst_path +
                                " (on the same token or another)");
    keystore::StoreMeta dmeta = keystore::read_store_meta(*dst_storage);
    if (dmeta.store_version != 2)
        throw UsageError("the destination store at " + o.dst_path + " is not a version 2 store");
    auto dst_lock = dst_storage->lock(!o.dry_run);

    pkcs11::TokenContext dctx = destination_token(o, src, dmeta, sum.same_token);
    auto dst = keystore::open_store_on(dctx, std::move(dst_storage), !o.dry_run, true, std::move(dst_lock));

    std::vector<KeyRing> moving = plan_migration(*src.store, *dst.store, sum);
    if (sum.to_move.empty() && !o.dry_run) {  // already migrated: nothing to add, nothing to refuse
        sum.seconds = seconds_since(t0);
        return sum;
    }
    if (!sum.others.empty() && !o.force && !o.dry_run)
        throw ConflictError("the destination store already holds " + std::to_string(sum.others.size()) +
                                " key rings that are not from this v1 store, " + sum.others.front() + " first",
                            "pass --force to add the v1 keys to it (nothing in it is changed or removed), "
                            "or migrate into an empty v2 store");
    if (o.dry_run || sum.to_move.empty()) {
        sum.seconds = seconds_since(t0);
        return sum;
    }

    move_rings(moving, src, dctx, *dst.store, o, sum);
    sum.seconds = seconds_since(t0);
    return sum;
}

}  // namespace keywarden::backup
