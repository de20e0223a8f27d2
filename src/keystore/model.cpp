// SPDX-License-Identifier: Apache-2.0
// Names, ids and times of the key store model.
#include <ctime>

#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"

namespace keywarden::keystore {

const char* const kClientIdRule =
    "a client id is 5 to 256 characters from A-Z a-z 0-9 '_' '-' and space (Acra's rule)";

namespace {
struct KindName {
    RingKind kind;
    const char* name;     // in formats and `list`
    const char* prefix;   // key id before the client id ("" for global rings)
    const char* suffix;   // key id after it
};
constexpr KindName kKinds[] = {
    {RingKind::storage_keypair, "storage-keypair", "client/", "/storage"},
    {RingKind::symmetric, "symmetric", "client/", "/symmetric"},
    {RingKind::hmac, "hmac", "client/", "/hmac"},
    {RingKind::poison_keypair, "poison-keypair", "", "poison/keypair"},
    {RingKind::poison_symmetric, "poison-symmetric", "", "poison/symmetric"},
    {RingKind::audit_log, "audit-log", "", "audit/log"},
};
const KindName& kind_entry(RingKind k) {
    for (const auto& e : kKinds)
        if (e.kind == k) return e;
    throw Error("unknown key ring kind");
}
bool is_client_kind(RingKind k) {
    return k == RingKind::storage_keypair || k == RingKind::symmetric || k == RingKind::hmac;
}
}  // namespace

const char* ring_kind_name(RingKind k) { return kind_entry(k).name; }

std::optional<RingKind> ring_kind_from_name(const std::string& s) {
    for (const auto& e : kKinds)
        if (s == e.name) return e.kind;
    return std::nullopt;
}

KeyKind key_kind_of(RingKind k) {
    switch (k) {
        case RingKind::storage_keypair:
        case RingKind::poison_keypair: return KeyKind::ec_p256_private;
        case RingKind::symmetric:
        case RingKind::poison_symmetric: return KeyKind::aes;
        case RingKind::hmac:
        case RingKind::audit_log: return KeyKind::generic_secret;
    }
    return KeyKind::aes;
}

bool has_public(RingKind k) { return key_kind_of(k) == KeyKind::ec_p256_private; }

const char* key_state_name(KeyState s) {
    switch (s) {
        case KeyState::pre_active: return "pre-active";
        case KeyState::active: return "active";
        case KeyState::suspended: return "suspended";
        case KeyState::deactivated: return "deactivated";
        case KeyState::compromised: return "compromised";
        case KeyState::destroyed: return "destroyed";
    }
    return "unknown";
}

std::optional<KeyState> key_state_from_name(const std::string& s) {
    for (KeyState k : {KeyState::pre_active, KeyState::active, KeyState::suspended,
                       KeyState::deactivated, KeyState::compromised, KeyState::destroyed})
        if (s == key_state_name(k)) return k;
    return std::nullopt;
}

void validate_client_id(const std::string& id) {
    std::string why;
    if (id.size() < 5) why = "it is too short (" + std::to_string(id.size()) + " characters)";
    else if (id.size() > 256) why = "it is too long (" + std::to_string(id.size()) + " characters)";
    else
        for (unsigned char c : id)
            if (!(std::isalnum(c) || c == '_' || c == '-' || c == ' ')) {
                why = "it contains a character outside the allowed set";
                break;
            }
    if (!why.empty())
        throw UsageError("invalid client id: " + why, std::string(kClientIdRule));
}

std::string KeyId::str() const {
    const auto& e = kind_entry(kind);
    if (is_client_kind(kind)) return std::string(e.prefix) + client_id + e.suffix;
    return e.suffix;
}

std::string KeyId::file() const {
    if (!is_client_kind(kind)) return "keys/" + str() + ".keyring";
    // A 256-character id would not fit in one path component (NAME_MAX 255): long ids are
    // stored under "~" + SHA-256 hex. '~' is not allowed in client ids, so names never clash.
    std::string dir = client_id;
    if (dir.size() > 200) {
        auto h = sha256(std::span<const std::uint8_t>(
            reinterpret_cast<const std::uint8_t*>(client_id.data()), client_id.size()));
        static const char* d = "0123456789abcdef";
        dir = "~";
        for (auto c : h) {
            dir.push_back(d[c >> 4]);
            dir.push_back(d[c & 15]);
        }
    }
    std::string suffix = kind_entry(kind).suffix;  // "/storage"
    return "keys/client/" + dir + suffix + ".keyring";
}

KeyId KeyId::client(RingKind kind, const std::string& client_id) {
    if (!is_client_kind(kind)) throw Error("not a per-client key kind");
    validate_client_id(client_id);
    return {kind, client_id};
}

KeyId KeyId::global(RingKind kind) {
    if (is_client_kind(kind)) throw Error("not a global key kind");
    return {kind, {}};
}

KeyId KeyId::parse(const std::string& s) {
    for (const auto& e : kKinds) {
        if (!is_client_kind(e.kind)) {
            if (s == e.suffix) return {e.kind, {}};
            continue;
        }
        std::string pre = e.prefix, suf = e.suffix;
        if (s.size() > pre.size() + suf.size() && s.starts_with(pre) && s.ends_with(suf)) {
            std::string cid = s.substr(pre.size(), s.size() - pre.size() - suf.size());
            return client(e.kind, cid);
        }
    }
    throw UsageError("unknown key id '" + s + "'",
                     "key ids are client/<client id>/storage, client/<client id>/symmetric, "
                     "client/<client id>/hmac, poison/keypair, poison/symmetric or audit/log "
                     "(see 'keywarden list')");
}

const KeyVersion* KeyRing::find(std::uint32_t v) const {
    for (const auto& k : versions)
        if (k.version == v) return &k;
    return nullptr;
}
KeyVersion* KeyRing::find(std::uint32_t v) {
    for (auto& k : versions)
        if (k.version == v) return &k;
    return nullptr;
}

std::string format_time(std::int64_t t) {
    std::time_t tt = static_cast<std::time_t>(t);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

std::int64_t now_seconds() { return static_cast<std::int64_t>(std::time(nullptr)); }

}  // namespace keywarden::keystore
