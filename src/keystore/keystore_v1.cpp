// SPDX-License-Identifier: Apache-2.0
// Key store v1 (see keystore_v1.hpp and docs/keystore-format.md, part 2).
#include "keywarden/keystore_v1.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <set>

#include "detail/format.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "util/bytes.hpp"

namespace keywarden::keystore {

using nlohmann::json;
using namespace detail;

namespace {

constexpr const char* kVersion1Text = "keywarden-keystore 1\n";
constexpr const char kKeyMagic[9] = "KWV1KEYF";
constexpr const char kPubMagic[9] = "KWV1PUBK";
constexpr std::uint16_t kKeyFileFormat = 1;
constexpr std::string_view kKeyDomain = "keywarden-v1-keyfile";
constexpr std::string_view kPubDomain = "keywarden-v1-pubfile";
constexpr const char* kOld = ".old/";
// Longest client id whose files fit in a 255-byte name: "<id>_storage_sym.old".
constexpr std::size_t kMaxV1ClientId = 239;

using util::same_bytes;
using util::to_bytes;

// magic (8) | format u16be | body length u32be | body | tag (the rest: 16 bytes for AES-CMAC)
Bytes seal_file(MacKey& mac, const char* magic, std::string_view domain, const std::string& binding,
                const std::string& body) {
    Bytes file = frame(magic, kKeyFileFormat, body);
    auto tag = mac.mac_parts(mac_parts_of(domain, binding, file));
    file.insert(file.end(), tag.begin(), tag.end());
    return file;
}

// The MAC is checked before a byte of the body is parsed; it binds the file to its own path.
json open_file(MacKey& mac, std::span<const std::uint8_t> file, const char* magic,
               std::string_view domain, const std::string& binding, const std::string& what) {
    if (file.size() < kHeaderSize + 16)
        throw IntegrityError(what + " is truncated (" + std::to_string(file.size()) + " bytes)");
    if (std::memcmp(file.data(), magic, 8) != 0)
        throw FormatError(what + " is not a keywarden v1 key file (bad magic)");
    std::uint16_t f = get_u16(file.data() + 8);
    if (f != kKeyFileFormat)
        throw FormatError(what + " has format version " + std::to_string(f) +
                              ", this keywarden reads version 1",
                          f > kKeyFileFormat ? "upgrade keywarden" : "");
    std::uint64_t n = get_u32(file.data() + 10);
    if (n + kHeaderSize + 16 > file.size() || file.size() - n - kHeaderSize > 64)
        throw IntegrityError(what + " has a length that does not match its header (truncated or "
                                    "extended)");
    auto signed_part = file.first(kHeaderSize + n);
    auto tag = file.subspan(kHeaderSize + n);
    if (!mac.verify_parts(mac_parts_of(domain, binding, signed_part), tag))
        throw IntegrityError(what + " does not verify (MAC mismatch)",
                             "the file was changed, renamed or copied from another key or store, "
                             "or the master key is not the one that wrote it");
    return parse_body(file, what);
}

std::string binding_of(const StoreMeta& m, const std::string& file) {
    return m.store_id + "/" + file;
}

// "2026-11-28T21:50:07.123456Z": the rotation time, which names a file under <file>.old/.
std::string stamp_text(std::int64_t seconds, int micros) {
    std::time_t tt = static_cast<std::time_t>(seconds);
    std::tm tm{};
    gmtime_r(&tt, &tm);
    char buf[40];
    std::size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    std::snprintf(buf + n, sizeof buf - n, ".%06dZ", micros);
    return buf;
}

bool is_stamp(const std::string& s) {
    static constexpr std::string_view shape = "dddd-dd-ddTdd:dd:dd.ddddddZ";
    if (s.size() != shape.size()) return false;
    for (std::size_t i = 0; i < s.size(); ++i)
        if (shape[i] == 'd' ? !(s[i] >= '0' && s[i] <= '9') : s[i] != shape[i]) return false;
    return true;
}

}  // namespace

// ---- names ----------------------------------------------------------------------------------

std::string v1_file(const KeyId& id) {
    if (!id.client_id.empty() && id.client_id.size() > kMaxV1ClientId)
        throw UsageError("client id of " + std::to_string(id.client_id.size()) +
                             " characters is too long for a v1 store (at most " +
                             std::to_string(kMaxV1ClientId) + ": it is part of a file name)",
                         "use a v2 store, which has no such limit ('keywarden migrate')");
    switch (id.kind) {
        case RingKind::storage_keypair: return id.client_id + "_storage";
        case RingKind::symmetric: return id.client_id + "_storage_sym";
        case RingKind::hmac: return id.client_id + "_hmac";
        case RingKind::poison_keypair: return ".poison_key/poison_key";
        case RingKind::poison_symmetric: return ".poison_key/poison_key_sym";
        case RingKind::audit_log: return "secure_log_key";
    }
    throw Error("internal: unknown ring kind");
}

std::optional<KeyId> v1_key_id_of(const std::string& f) {
    if (f == "secure_log_key") return KeyId::global(RingKind::audit_log);
    if (f == ".poison_key/poison_key") return KeyId::global(RingKind::poison_keypair);
    if (f == ".poison_key/poison_key_sym") return KeyId::global(RingKind::poison_symmetric);
    if (f.find('/') != std::string::npos) return std::nullopt;
    // Longest suffix first: "<id>_storage_sym" is never a keypair of client "<id>_storage_sym"
    // (that file would end in "_storage").
    for (auto [suffix, kind] : {std::pair{"_storage_sym", RingKind::symmetric},
                                std::pair{"_storage", RingKind::storage_keypair},
                                std::pair{"_hmac", RingKind::hmac}}) {
        std::string_view sv = suffix;
        if (f.size() > sv.size() && f.ends_with(sv)) {
            std::string client = f.substr(0, f.size() - sv.size());
            try {
                validate_client_id(client);
            } catch (const UsageError&) {
                return std::nullopt;
            }
            return KeyId::client(kind, client);
        }
    }
    return std::nullopt;
}

// ---- init and open --------------------------------------------------------------------------

void KeyStoreV1::init(Storage& storage, MasterKeys& keys, StoreMeta meta, const std::function<void()>& before_version) {
    storage.create();
    auto lock = storage.lock(true);
    refuse_if_store_appeared(storage);
    meta.store_version = 1;
    meta.signature.label = meta.encryption.label;  // one master key does both
    meta.signature.id = meta.encryption.id;
    complete_new_meta(meta, keys);
    storage.write(kMetaFile, to_bytes(meta_to_json(meta).dump(2) + "\n"), true);
    // The version file goes last: until it exists the directory is not a store.
    if (before_version) before_version();
    storage.write(kVersionFile, to_bytes(kVersion1Text), true);
}

KeyStoreV1::KeyStoreV1(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable)
    : m_storage(std::move(storage)), m_keys(std::move(keys)), m_writable(writable) {}

KeyStoreV1::~KeyStoreV1() = default;

std::unique_ptr<KeyStoreV1> KeyStoreV1::open(std::unique_ptr<Storage> storage, MasterKeys keys,
                                             bool writable, std::unique_ptr<StorageLock> lock) {
    std::unique_ptr<KeyStoreV1> ks(new KeyStoreV1(std::move(storage), std::move(keys), writable));
    ks->m_meta = read_store_meta(*ks->m_storage);
    if (ks->m_meta.store_version != 1)
        throw FormatError("the store at " + ks->m_storage->describe() + " is a version " +
                          std::to_string(ks->m_meta.store_version) + " store, not version 1");
    ks->m_lock = lock ? std::move(lock) : ks->m_storage->lock(writable);
    auto expect = [&](const Bytes& found, const Bytes& want) {
        if (same_bytes(found, want)) return;
        throw TokenError("the master key found is not this store's: expected '" +
                             ks->m_meta.encryption.label + "' with check value " + to_hex(want) +
                             ", found " + to_hex(found),
                         "select the token this store was created on (serial " +
                             ks->m_meta.token_serial + ")");
    };
    expect(ks->m_keys.protector->key_check_value(), ks->m_meta.encryption.kcv);
    expect(ks->m_keys.mac->key_check_value(), ks->m_meta.signature.kcv);
    if (ks->m_meta.protection != ks->m_keys.protector->method())
        throw TokenError("the store was written with " + ks->m_meta.protection +
                         " but this token would use " + ks->m_keys.protector->method());
    return ks;
}

// ---- reading --------------------------------------------------------------------------------

struct KeyStoreV1::Loaded {
    KeyRing ring;
    std::map<std::uint32_t, std::string> file_of;  // which file holds each version
    std::optional<std::uint32_t> in_key_file;       // the version in the key file itself
    // Copies of a version that another file also holds (the trace of an interrupted rotation):
    // never read, but they hold a key, so destroy and the next rotation remove them.
    std::vector<std::string> duplicates;
};

KeyStoreV1::Loaded KeyStoreV1::load_files(const KeyId& id) const {
    auto l = find_files(id);
    if (!l)
        throw NotFoundError("no key " + id.str() + " in the store (no file " + v1_file(id) + ")",
                            "see 'keywarden list', or create it with 'keywarden generate'");
    return std::move(*l);
}

std::optional<KeyStoreV1::Loaded> KeyStoreV1::find_files(const KeyId& id) const {
    std::string f = v1_file(id);
    Loaded out;
    out.ring.id = id;
    auto read_one = [&](const std::string& name, bool key_file) {
        auto raw = m_storage->read(name);
        if (!raw) return;
        std::string what = "key file " + name;
        json body = open_file(*m_keys.mac, *raw, kKeyMagic, kKeyDomain, binding_of(m_meta, name), what);
        KeyRing one;
        try {
            if (body.at("file").get<std::string>() != name)
                throw IntegrityError(what + " names another file");
            one = ring_from_json(body, m_meta.store_id);
        } catch (const json::exception& e) {
            throw FormatError(what + ": missing or mistyped field: " + e.what());
        }
        if (!(one.id == id)) throw IntegrityError(what + " holds " + one.id.str() + ", not " + id.str());
        if (one.versions.size() != 1) throw IntegrityError(what + " must hold exactly one version");
        KeyVersion& v = one.versions.front();
        if (!key_file && one.current)
            throw IntegrityError(what + " is a rotated-out version but claims to be current");
        if (one.current && *one.current != v.version)
            throw IntegrityError(what + " names a current version it does not hold");
        // A version found twice is the trace of an interrupted rotation: the key file wins,
        // then the newest rotated copy (the names sort by time).
        if (out.file_of.count(v.version)) {
            if (!key_file && out.file_of[v.version] > name) {
                out.duplicates.push_back(name);
                return;
            }
            out.duplicates.push_back(out.file_of[v.version]);
            std::erase_if(out.ring.versions, [&](const KeyVersion& x) { return x.version == v.version; });
        }
        out.file_of[v.version] = name;
        if (key_file) {
            out.in_key_file = v.version;
            out.ring.current = one.current;
        }
        out.ring.versions.push_back(std::move(v));
    };
    std::vector<std::string> olds;
    for (const auto& name : m_storage->list(f + ".old")) {
        std::string stamp = name.substr(f.size() + std::strlen(kOld));
        if (is_stamp(stamp)) olds.push_back(name);
    }
    std::sort(olds.begin(), olds.end());
    for (const auto& name : olds) read_one(name, false);
    read_one(f, true);
    if (out.ring.versions.empty()) return std::nullopt;
    std::sort(out.ring.versions.begin(), out.ring.versions.end(),
              [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });
    return out;
}

KeyRing KeyStoreV1::load(const KeyId& id, bool) const { return load_files(id).ring; }

std::vector<KeyId> KeyStoreV1::key_ids() const {
    std::set<std::string> seen;
    std::vector<KeyId> out;
    for (const auto& name : m_storage->list("")) {
        std::string base = name;
        if (auto p = name.find(".old/"); p != std::string::npos) base = name.substr(0, p);
        auto id = v1_key_id_of(base);
        if (id && seen.insert(id->str()).second) out.push_back(*id);
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::vector<RingSummary> KeyStoreV1::list() const {
    std::vector<RingSummary> out;
    for (const auto& id : key_ids()) {
        try {
            out.push_back(summarize(load(id)));
        } catch (const IntegrityError& e) {
            RingSummary r;
            r.key_id = id.str();
            r.kind = id.kind;
            r.client_id = id.client_id;
            r.problem = e.what();
            out.push_back(std::move(r));
        }
    }
    return out;
}

bool KeyStoreV1::contains(const KeyId& id) const {
    std::string f = v1_file(id);
    return m_storage->read(f).has_value() || !m_storage->list(f + ".old").empty();
}

// ---- writing --------------------------------------------------------------------------------

void KeyStoreV1::write_key_file(const std::string& file, const KeyRing& single, bool synced) {
    json body = ring_to_json(single, m_meta.store_id);
    body["file"] = file;
    Bytes bytes = seal_file(*m_keys.mac, kKeyMagic, kKeyDomain, binding_of(m_meta, file), body.dump());
    if (synced) m_storage->write(file, bytes);
    else m_storage->write_unsynced(file, bytes);
}

void KeyStoreV1::write_pub_file(const KeyId& id, const KeyVersion& v, bool synced) {
    std::string file = v1_file(id) + ".pub";
    json body = {{"format", kKeyFileFormat}, {"store_id", m_meta.store_id}, {"key_id", id.str()},
                 {"file", file}, {"version", v.version}, {"public", to_base64(v.public_key)}};
    Bytes bytes = seal_file(*m_keys.mac, kPubMagic, kPubDomain, binding_of(m_meta, file), body.dump());
    if (synced) m_storage->write(file, bytes);
    else m_storage->write_unsynced(file, bytes);
}

std::string KeyStoreV1::fresh_stamp(const std::string& file, std::int64_t seconds, int micros) const {
    for (;; ++micros) {
        if (micros > 999999) {
            micros = 0;
            ++seconds;
        }
        std::string name = file + kOld + stamp_text(seconds, micros);
        if (!m_storage->read(name)) return name;
    }
}

namespace {
KeyRing single(const KeyRing& r, const KeyVersion& v, bool current) {
    KeyRing one;
    one.id = r.id;
    one.versions.push_back(v);
    if (current) one.current = v.version;
    return one;
}
}  // namespace

void KeyStoreV1::generate(const std::vector<KeyId>& ids, const std::function<void(std::size_t)>& progress) {
    if (!m_writable) throw Error("internal: store opened read-only");
    std::set<std::string> seen;
    for (const auto& id : ids) {
        v1_file(id);  // refuses ids too long for a file name, before anything is written
        if (!seen.insert(id.str()).second)
            throw UsageError("key id " + id.str() + " appears twice in one request");
    }
    // Every new key is made and wrapped in the token before the first file is written, so that
    // a token failure changes nothing. (A v1 store has no manifest: the files of a batch are
    // then written one by one, and a failure of the disk there leaves the earlier ones done.)
    auto now_tp = std::chrono::system_clock::now();
    std::int64_t now = std::chrono::duration_cast<std::chrono::seconds>(now_tp.time_since_epoch()).count();
    int micros = static_cast<int>(
        std::chrono::duration_cast<std::chrono::microseconds>(now_tp.time_since_epoch()).count() % 1000000);
    std::vector<Loaded> plans;
    plans.reserve(ids.size());
    for (const auto& id : ids) {
        Loaded l = find_files(id).value_or(Loaded{});
        l.ring.id = id;
        add_current_version(m_keys, l.ring, now);
        plans.push_back(std::move(l));
    }
    for (std::size_t i = 0; i < plans.size(); ++i) {
        Loaded& l = plans[i];
        const KeyId& id = l.ring.id;
        std::string f = v1_file(id);
        // 1. the version leaving the key file is kept under <file>.old/<time>, unless an
        //    interrupted rotation already left a copy there; 2. the new version replaces the key
        //    file (atomic rename); 3. the public half. A crash between 1 and 2 leaves the same
        //    version twice, which load_files resolves and the next rotation or destroy removes.
        std::string old_copy;
        if (l.in_key_file) {
            bool copied = false;
            for (const auto& d : l.duplicates) copied |= d.starts_with(f + kOld);
            if (!copied) {
                const KeyVersion* old = l.ring.find(*l.in_key_file);
                old_copy = fresh_stamp(f, now, micros);
                write_key_file(old_copy, single(l.ring, *old, false), true);
            }
        }
        const KeyVersion& fresh = l.ring.versions.back();
        try {
            write_key_file(f, single(l.ring, fresh, true), true);
        } catch (...) {
            if (!old_copy.empty()) m_storage->remove(old_copy);  // the key file still holds it
            throw;
        }
        if (has_public(id.kind)) write_pub_file(id, fresh, true);
        if (progress) progress(i + 1);
    }
}

void KeyStoreV1::destroy(const KeyId& id, std::optional<std::uint32_t> version) {
    if (!m_writable) throw Error("internal: store opened read-only");
    Loaded l = load_files(id);
    KeyRing before = l.ring;
    destroy_versions(l.ring, version, now_seconds());
    for (const auto& v : l.ring.versions) {
        const KeyVersion* was = before.find(v.version);
        if (was && was->state == v.state) continue;
        const std::string& file = l.file_of.at(v.version);
        bool in_key_file = l.in_key_file && *l.in_key_file == v.version;
        // The key file keeps a destroyed current version as a tombstone: it is no longer current.
        write_key_file(file, single(l.ring, v, in_key_file && l.ring.current == v.version), true);
    }
    // Copies left by an interrupted rotation hold keys too: a destroyed key must not survive in
    // one. Each is removed once the tombstone is written; a copy of a version that is still live
    // goes as well, since the file that load_files reads holds that version.
    for (const auto& d : l.duplicates) m_storage->remove(d);
}

void KeyStoreV1::put_ring(const KeyRing& r) {
    if (!m_writable) throw Error("internal: store opened read-only");
    if (r.versions.empty()) throw Error("internal: empty key ring");
    std::string f = v1_file(r.id);
    if (contains(r.id)) throw ConflictError(r.id.str() + " already exists in the v1 store");
    std::uint32_t in_file = r.current ? *r.current : r.versions.back().version;
    for (const auto& v : r.versions) {
        if (v.version == in_file) continue;
        std::int64_t when = v.valid_until ? *v.valid_until : v.created;
        write_key_file(fresh_stamp(f, when, 0), single(r, v, false), false);
    }
    const KeyVersion* top = r.find(in_file);
    if (!top) throw Error("internal: current version missing");
    write_key_file(f, single(r, *top, r.current.has_value()), false);
    if (has_public(r.id.kind) && !top->public_key.empty()) write_pub_file(r.id, *top, false);
}

// ---- verify ---------------------------------------------------------------------------------

VerifyReport KeyStoreV1::verify(const std::function<void(std::size_t)>& progress) const {
    VerifyReport rep;
    std::set<std::string> known = {kVersionFile, kMetaFile};
    auto ids = key_ids();
    for (const auto& id : ids) {
        std::string f = v1_file(id);
        known.insert(f);
        if (has_public(id.kind)) known.insert(f + ".pub");
        for (const auto& name : m_storage->list(f + ".old"))
            if (is_stamp(name.substr(f.size() + std::strlen(kOld)))) known.insert(name);
    }
    for (const auto& name : m_storage->list(""))
        if (!known.count(name)) rep.problems.push_back({name, "unexpected file: not a key file of this layout"});
    std::size_t i = 0;
    for (const auto& id : ids) {
        ++rep.rings;
        std::string idstr = id.str();
        try {
            Loaded l = load_files(id);
            check_ring_keys(m_keys, l.ring, rep);
            for (const auto& d : l.duplicates)
                rep.problems.push_back({idstr, d + " is a second copy of a version, left by an interrupted "
                                               "rotation: run 'keywarden rotate " + idstr + "' to finish it"});
            if (!l.in_key_file)
                rep.problems.push_back({idstr, "the key file " + v1_file(id) + " is missing; only rotated versions remain"});
            if (has_public(id.kind) && l.ring.current) {
                std::string pf = v1_file(id) + ".pub";
                auto raw = m_storage->read(pf);
                if (!raw) {
                    rep.problems.push_back({idstr, "public key file " + pf + " is missing"});
                } else {
                    json b = open_file(*m_keys.mac, *raw, kPubMagic, kPubDomain, binding_of(m_meta, pf),
                                       "public key file " + pf);
                    const KeyVersion& cur = pick_version(l.ring, std::nullopt);
                    auto pub = from_base64(b.value("public", std::string()));
                    if (b.value("key_id", std::string()) != idstr || b.value("version", 0u) != cur.version ||
                        !pub || *pub != cur.public_key)
                        rep.problems.push_back({idstr, "public key file " + pf +
                                                           " does not hold the current version's public key"});
                }
            }
        } catch (const Error& e) {
            rep.problems.push_back({idstr, e.what()});
        }
        if (progress) progress(++i);
    }
    return rep;
}

}  // namespace keywarden::keystore
