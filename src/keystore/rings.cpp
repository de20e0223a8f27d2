// SPDX-License-Identifier: Apache-2.0
// Operations on one key ring that both store versions share: which version `read` means, a new
// current version, destroying versions, reading and checking key material in the token.
#include <openssl/crypto.h>

#include <algorithm>

#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"
#include "util/bytes.hpp"

namespace keywarden::keystore {

using util::same_bytes;

const KeyVersion& pick_version(const KeyRing& r, std::optional<std::uint32_t> version) {
    std::uint32_t v = 0;
    if (version) v = *version;
    else if (r.current) v = *r.current;
    else
        throw NotFoundError(r.id.str() + " has no current version (it was destroyed)",
                            "generate a new version, or name an older one with --version");
    const KeyVersion* kv = r.find(v);
    if (!kv) throw NotFoundError(r.id.str() + " has no version " + std::to_string(v));
    return *kv;
}

KeyVersion make_key_version(const MasterKeys& keys, const KeyId& id, std::uint32_t number,
                            std::int64_t now) {
    KeyVersion v;
    v.version = number;
    v.state = KeyState::active;
    v.created = now;
    v.valid_from = now;
    v.key_type = key_kind_of(id.kind);
    v.key_length = 32;
    auto key = keys.backend->generate(v.key_type, has_public(id.kind) ? &v.public_key : nullptr);
    v.kcv = keys.backend->check_value(*key, v.public_key);
    v.protection = keys.protector->method();
    v.wrapped = keys.protector->protect(*key);
    return v;
}

void add_current_version(const MasterKeys& keys, KeyRing& r, std::int64_t now) {
    std::uint32_t next = 1;
    for (const auto& v : r.versions) next = std::max(next, v.version + 1);
    if (r.current) {
        KeyVersion* cur = r.find(*r.current);
        if (cur && cur->state == KeyState::active) {
            cur->state = KeyState::deactivated;
            cur->valid_until = now;
        }
    }
    r.versions.push_back(make_key_version(keys, r.id, next, now));
    r.current = next;
}

void destroy_versions(KeyRing& r, std::optional<std::uint32_t> version, std::int64_t now) {
    if (version && !r.find(*version))
        throw NotFoundError(r.id.str() + " has no version " + std::to_string(*version));
    bool changed = false;
    for (auto& v : r.versions) {
        if (version && v.version != *version) continue;
        if (v.state == KeyState::destroyed) continue;
        // Only the wrapped copy exists; dropping it destroys the key (the token never held it
        // as a persistent object).
        v.wrapped.clear();
        v.state = KeyState::destroyed;
        if (!v.valid_until || *v.valid_until > now) v.valid_until = now;
        if (r.current && *r.current == v.version) r.current.reset();
        changed = true;
    }
    if (!changed)
        throw NotFoundError(r.id.str() + (version ? " version " + std::to_string(*version) : "") +
                            " is already destroyed");
}

SecureBytes unwrap_readable(const MasterKeys& keys, const KeyId& id, const KeyVersion& v) {
    if (v.state == KeyState::destroyed)
        throw NotFoundError(id.str() + " version " + std::to_string(v.version) +
                            " was destroyed; its key material is gone");
    if (v.wrapped.empty())
        throw NotFoundError(id.str() + " version " + std::to_string(v.version) +
                                " holds only its public half",
                            "it was restored from a backup made without --private-keys");
    auto key = keys.protector->unprotect(v.wrapped, {v.key_type, v.key_length}, Exposure::readable);
    if (!same_bytes(keys.backend->check_value(*key, v.public_key), v.kcv))
        throw IntegrityError(id.str() + " version " + std::to_string(v.version) +
                             " unwrapped to a key whose check value differs from the record");
    return key->value();
}

void check_ring_keys(const MasterKeys& keys, const KeyRing& r, VerifyReport& rep) {
    std::string idstr = r.id.str();
    for (const auto& v : r.versions) {
        std::string which = "version " + std::to_string(v.version);
        if (v.state == KeyState::destroyed) {
            if (!v.wrapped.empty())
                rep.problems.push_back({idstr, which + " is marked destroyed but still holds key material"});
            continue;
        }
        if (v.wrapped.empty()) {
            // A public half restored from a public-only backup: check what is there.
            auto h = sha256(v.public_key);
            h.resize(8);
            if (v.public_key.empty() || !same_bytes(h, v.kcv))
                rep.problems.push_back({idstr, which + " has no key material"});
            continue;
        }
        try {
            auto key = keys.protector->unprotect(v.wrapped, {v.key_type, v.key_length}, Exposure::sensitive);
            if (!same_bytes(keys.backend->check_value(*key, v.public_key), v.kcv))
                throw IntegrityError("key check value differs from the record");
            ++rep.keys_checked;
        } catch (const Error& e) {
            rep.problems.push_back({idstr, which + ": " + e.what()});
        }
    }
}

SecureBytes Store::read_secret(const KeyId& id, std::optional<std::uint32_t> version) const {
    KeyRing r = load(id);
    return unwrap_readable(master_keys(), id, pick_version(r, version));
}

Bytes Store::read_public(const KeyId& id, std::optional<std::uint32_t> version) const {
    if (!has_public(id.kind))
        throw UsageError(id.str() + " is a symmetric key: it has no public half",
                         "use --private to read it");
    KeyRing r = load(id);
    return pick_version(r, version).public_key;
}

}  // namespace keywarden::keystore
