// SPDX-License-Identifier: Apache-2.0
// Key store v2 operations: init, open, read, verify (writing: keystore_write.cpp).
#include "keywarden/keystore.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "detail/format.hpp"
#include "detail/store_v2.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/strict_json.hpp"
#include "util/bytes.hpp"

namespace keywarden::keystore {

using nlohmann::json;
using namespace detail;

const char* const kVersionFile = "version";
const char* const kMetaFile = "store.json";
const char* const kManifestFile = "manifest";

using util::same_bytes;
using util::to_bytes;

KeyStore::Manifest& KeyStore::manifest() const {
    if (!m_manifest) throw Error("internal: this store was opened for one streamed pass only");
    return *m_manifest;
}

std::optional<int> detect_store_version(const Storage& storage) {
    auto v = storage.read(kVersionFile);
    if (!v) return std::nullopt;
    std::string s(v->begin(), v->end());
    if (s == kVersion2Text) return 2;
    if (s == "keywarden-keystore 1\n") return 1;
    throw FormatError(storage.describe() + "/version is not a keywarden store version file");
}

StoreMeta read_store_meta(const Storage& storage) {
    storage.check_permissions();
    auto version = detect_store_version(storage);
    if (!version)
        throw NotFoundError("no key store at " + storage.describe() + " (no version file)",
                            "create one with 'keywarden init', or point --keystore / "
                            "KEYWARDEN_KEYSTORE at an existing store");
    auto raw = storage.read(kMetaFile);
    if (!raw) throw IntegrityError("store.json is missing from " + storage.describe());
    StoreMeta m;
    try {
        m = meta_from_json(json::parse(*raw));
    } catch (const json::exception& e) {
        throw IntegrityError(std::string("store.json is not valid JSON: ") + e.what());
    }
    if (m.store_version != *version)
        throw IntegrityError("store.json says store version " + std::to_string(m.store_version) +
                             " but the version file says " + std::to_string(*version));
    return m;
}

// ---- init -----------------------------------------------------------------------------------

// create() accepted an empty directory; another init may have written a store into it since.
void detail::refuse_if_store_appeared(const Storage& storage) {
    if (storage.read(kMetaFile) || storage.read(kVersionFile))
        throw ConflictError("another init created a store at " + storage.describe() + " meanwhile",
                            "keywarden init never touches an existing store; choose another --keystore path");
}

void detail::complete_new_meta(StoreMeta& meta, MasterKeys& keys) {
    if (meta.store_id.empty()) {
        std::uint8_t id[16];
        if (RAND_bytes(id, sizeof id) != 1) throw OpenSslError("RAND_bytes");
        meta.store_id = to_hex(id);
    }
    if (meta.created == 0) meta.created = now_seconds();
    meta.protection = keys.protector->method();
    meta.encryption.kcv = keys.protector->key_check_value();
    meta.signature.kcv = keys.mac->key_check_value();
}

void KeyStore::init(Storage& storage, MasterKeys& keys, StoreMeta meta, const std::function<void()>& before_version) {
    storage.create();
    auto lock = storage.lock(true);
    refuse_if_store_appeared(storage);
    complete_new_meta(meta, keys);
    Bytes meta_bytes = to_bytes(meta_to_json(meta).dump(2) + "\n");

    ManifestData m;
    m.store_id = meta.store_id;
    m.generation = 1;
    m.meta_sha256 = hex_digest(meta_bytes);
    // The version file goes last: until it exists the directory is not a store.
    storage.write(kMetaFile, meta_bytes, true);
    storage.write(kManifestFile,
                  seal(*keys.mac, kManifestMagic, kManifestFormat, kManifestDomain, m.store_id,
                       manifest_body(m)),
                  true);
    if (before_version) before_version();
    storage.write(kVersionFile, to_bytes(kVersion2Text), true);
}

// ---- open -----------------------------------------------------------------------------------

KeyStore::KeyStore(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable)
    : m_storage(std::move(storage)), m_keys(std::move(keys)), m_writable(writable) {}

KeyStore::~KeyStore() = default;

namespace {
constexpr int kLenient = 0, kStrict = 1, kStreaming = 2;
}

std::unique_ptr<KeyStore> KeyStore::open(std::unique_ptr<Storage> storage, MasterKeys keys,
                                         bool writable, bool strict,
                                         std::unique_ptr<StorageLock> lock) {
    return open_impl(std::move(storage), std::move(keys), writable, strict ? kStrict : kLenient, std::move(lock));
}

std::unique_ptr<KeyStore> KeyStore::open_impl(std::unique_ptr<Storage> storage, MasterKeys keys, bool writable,
                                              int mode, std::unique_ptr<StorageLock> lock) {
    std::unique_ptr<KeyStore> ks(new KeyStore(std::move(storage), std::move(keys), writable));
    ks->m_meta = read_store_meta(*ks->m_storage);
    if (ks->m_meta.store_version != 2)
        throw UsageError("the store at " + ks->m_storage->describe() + " is a version " +
                              std::to_string(ks->m_meta.store_version) + " store",
                          "this command needs a version 2 store; for a v1 store use 'keywarden "
                          "backup', or move its keys into a v2 store with 'keywarden migrate'");
    // Readers share the lock, writers hold it alone: a reader sees the old or the new state.
    ks->m_lock = lock ? std::move(lock) : ks->m_storage->lock(writable);
    // The keys found in the token must be the ones store.json names, by check value.
    auto expect = [&](const Bytes& found, const MasterKeyRecord& want, const char* role) {
        if (same_bytes(found, want.kcv)) return;
        throw TokenError(std::string("the master ") + role + " key found is not this store's: expected '" +
                             want.label + "' with check value " + to_hex(want.kcv) + ", found " +
                             to_hex(found),
                         "select the token this store was created on (serial " +
                             ks->m_meta.token_serial + ")");
    };
    expect(ks->m_keys.protector->key_check_value(), ks->m_meta.encryption, "encryption");
    expect(ks->m_keys.mac->key_check_value(), ks->m_meta.signature, "signature");
    if (ks->m_meta.protection != ks->m_keys.protector->method())
        throw TokenError("the store was written with " + ks->m_meta.protection +
                         " but this token would use " + ks->m_keys.protector->method());
    if (mode == kStreaming) {
        ks->scan_manifest();
        return ks;
    }
    ks->load_manifest();
    auto files = ks->m_storage->list("keys");
    ks->recover_pending(files);
    ks->check_files(files, mode == kStrict);
    return ks;
}

std::unique_ptr<KeyStore> KeyStore::open_streaming(std::unique_ptr<Storage> storage, MasterKeys keys,
                                                   std::unique_ptr<StorageLock> lock) {
    return open_impl(std::move(storage), std::move(keys), false, kStreaming, std::move(lock));
}

// The streamed counterpart of load_manifest: the same checks, nothing kept but counts and the
// file's SHA-256.
void KeyStore::scan_manifest() {
    auto in = m_storage->open_reader(kManifestFile);
    if (!in) throw IntegrityError("the signed manifest is missing from " + m_storage->describe());
    auto mac = m_keys.mac->stream();
    ManifestScanner scan(std::move(in), mac.get(), kManifestDomain, m_meta.store_id);
    auto st = std::make_unique<Streamed>();
    try {
        while (auto e = scan.next()) {
            auto& c = st->counts[e->second.summary.kind];
            ++c.rings;
            c.versions += e->second.summary.versions.size();
        }
    } catch (const Error&) {
        // The body is parsed as it streams, before its MAC can be checked. A loaded store checks
        // the length, then the MAC, then parses: the same order decides what is reported.
        if (!scan.drain())
            throw IntegrityError("manifest has a length that does not match its header (truncated or extended)");
        if (!same_bytes(mac->final(), scan.tag())) throw mac_mismatch("manifest");
        throw;
    }
    if (!same_bytes(mac->final(), scan.tag())) throw mac_mismatch("manifest");
    check_manifest_top(scan.top());
    st->sha256 = scan.sha256();
    m_streamed = std::move(st);
}

void KeyStore::load_manifest() {
    auto raw = m_storage->read(kManifestFile);
    if (!raw) throw IntegrityError("the signed manifest is missing from " + m_storage->describe());
    verify_signed(*m_keys.mac, *raw, kManifestMagic, kManifestFormat, kManifestDomain,
                  m_meta.store_id, "manifest");
    m_manifest = std::make_unique<Manifest>();
    m_manifest->data = parse_manifest_body(*raw);
    check_manifest_top(m_manifest->data);
}

// After the MAC: the manifest is this store's, and store.json is the one it names.
void KeyStore::check_manifest_top(const ManifestData& m) const {
    if (m.store_id != m_meta.store_id) throw IntegrityError("the manifest belongs to another store");
    auto meta_raw = m_storage->read(kMetaFile);
    if (!meta_raw || hex_digest(*meta_raw) != m.meta_sha256)
        throw IntegrityError("store.json does not match the signed manifest");
}

// A write puts every changed ring in "<file>.pending", then commits the manifest, then renames.
// After a crash, the manifest's digests say which copy is the committed one.
void KeyStore::recover_pending(std::vector<std::string>& files) {
    std::map<std::string, const ManifestEntry*> by_file;  // built only if a pending file exists
    for (auto& name : files) {
        if (!name.ends_with(kPending)) continue;
        if (by_file.empty())
            for (const auto& [id, e] : manifest().data.rings) by_file.emplace(e.file, &e);
        std::string final_name = name.substr(0, name.size() - std::strlen(kPending));
        auto it = by_file.find(final_name);
        const ManifestEntry* entry = it == by_file.end() ? nullptr : it->second;
        auto pending = m_storage->read(name);
        bool committed = entry && pending && hex_digest(*pending) == entry->sha256;
        if (!m_writable) {
            if (committed) manifest().pending.insert(final_name);
            continue;
        }
        if (committed) {
            m_storage->rename(name, final_name);
            name = final_name;  // the listing now holds the final name (once: it may be there already)
        } else {
            m_storage->remove(name);  // written but never committed
        }
    }
}

void KeyStore::check_files(const std::vector<std::string>& files, bool strict) {
    std::set<std::string> expected;
    for (const auto& [id, e] : manifest().data.rings) expected.insert(e.file);
    std::set<std::string> present;
    for (const auto& name : files) {
        if (name.ends_with(kPending)) continue;
        present.insert(name);
        if (!expected.count(name))
            m_file_problems.push_back({name, "unexpected file, not in the signed manifest"});
    }
    for (const auto& [id, e] : manifest().data.rings)
        if (!present.count(e.file) && !manifest().pending.count(e.file))
            m_file_problems.push_back({id, "key ring file " + e.file + " is missing"});
    if (!strict || m_file_problems.empty()) return;
    const auto& p = m_file_problems.front();
    std::string more = m_file_problems.size() > 1
                           ? " (and " + std::to_string(m_file_problems.size() - 1) + " more)"
                           : "";
    throw IntegrityError(p.key_id + ": " + p.problem + more,
                         "run 'keywarden keystore verify' for the full list; restore missing "
                         "rings from a backup and move unexpected files out");
}

std::uint64_t KeyStore::generation() const { return manifest().data.generation; }

// ---- reading --------------------------------------------------------------------------------

std::vector<RingSummary> KeyStore::list() const {
    std::vector<RingSummary> out;
    out.reserve(manifest().data.rings.size());
    for (const auto& [id, e] : manifest().data.rings) out.push_back(e.summary);
    return out;
}

std::vector<KeyId> KeyStore::key_ids() const {
    std::vector<KeyId> out;
    for (const auto& [id, e] : manifest().data.rings) out.push_back(KeyId::parse(id));
    return out;
}

bool KeyStore::contains(const KeyId& id) const {
    return manifest().data.rings.count(id.str()) != 0;
}

std::size_t KeyStore::version_count(const KeyId& id) const {
    auto it = manifest().data.rings.find(id.str());
    if (it == manifest().data.rings.end()) throw NotFoundError("no key ring " + id.str() + " in the store");
    return it->second.summary.versions.size();
}

std::string KeyStore::pending_text(const PendingRing& p) {
    return manifest_member(p.key_id, ManifestEntry{p.file, p.sha256, p.summary});
}

// A manifest member's name (its key id), the JSON string it starts with, and where that string
// ends; nullopt if the text does not start with a whole JSON string.
std::optional<std::pair<std::string, std::size_t>> detail::member_name(std::string_view text) {
    if (auto plain = StrictJson(text).str()) return std::make_pair(std::string(*plain), plain->size() + 2);
    if (!text.starts_with('"')) return std::nullopt;
    // A name with escapes: its end is the first unescaped quote after the opening one.
    bool escaped = false;
    for (std::size_t i = 1; i < text.size(); ++i) {
        if (escaped) escaped = false;
        else if (text[i] == '\\') escaped = true;
        else if (text[i] == '"') {
            try {
                return std::make_pair(json::parse(text.substr(0, i + 1)).get<std::string>(), i + 1);
            } catch (const json::exception&) {
                return std::nullopt;
            }
        }
    }
    return std::nullopt;
}

KeyStore::PendingRing KeyStore::pending_from_text(std::string_view line) {
    // Written by pending_text in another keywarden process: the name, ':', the value.
    auto name = member_name(line);
    if (!name) throw Error("internal: a bad ring record from a worker");
    auto [id, colon] = std::move(*name);
    if (colon >= line.size() || line[colon] != ':') throw Error("internal: a bad ring record from a worker");
    auto e = entry_from_text(id, line.substr(colon + 1));
    if (!e) throw Error("internal: a bad ring record from a worker");
    return PendingRing{id, std::move(e->file), std::move(e->sha256), std::move(e->summary)};
}

KeyRing KeyStore::load(const KeyId& id, bool check_mac) const {
    auto it = manifest().data.rings.find(id.str());
    if (it == manifest().data.rings.end())
        throw NotFoundError("no key ring " + id.str() + " in the store",
                            "see 'keywarden list', or create it with 'keywarden generate'");
    return load_entry(id, it->second.file, it->second.sha256, check_mac);
}

KeyRing KeyStore::load_entry(const KeyId& id, const std::string& file, const std::string& sha256,
                             bool check_mac) const {
    std::optional<Bytes> raw;
    std::string digest;
    if (m_manifest) {
        raw = m_storage->read(m_manifest->pending.count(file) ? file + kPending : file);
        if (raw) digest = hex_digest(*raw);
    } else {
        // A streamed store did not look for pending files at open. After a writer crashed
        // between its commit and its renames, the committed copy is the pending one: the one
        // whose digest is the manifest's.
        raw = m_storage->read(file);
        if (raw) digest = hex_digest(*raw);
        if (!raw || digest != sha256) {
            if (auto pending = m_storage->read(file + kPending); pending && hex_digest(*pending) == sha256) {
                raw = std::move(pending);
                digest = sha256;
            }
        }
    }
    if (!raw) throw IntegrityError("key ring file " + file + " is missing");
    // The digest check catches an older signed copy put back; the MAC catches everything else.
    if (digest != sha256)
        throw IntegrityError("key ring " + id.str() + " does not match the signed manifest",
                             "the file was replaced (an older copy?) or changed");
    if (check_mac)
        verify_signed(*m_keys.mac, *raw, kRingMagic, kRingFormat, kRingDomain, ring_binding(m_meta.store_id, id),
                      "key ring " + id.str());
    else
        check_frame(*raw, kRingMagic, kRingFormat, "key ring " + id.str());
    KeyRing r = ring_from_body(*raw, m_meta.store_id, "key ring " + id.str());
    if (!(r.id == id)) throw IntegrityError("key ring " + id.str() + " names another key id");
    return r;
}

// ---- one streamed pass over every ring ---------------------------------------------------------

struct KeyStore::RingCursor::State {
    const KeyStore* store;
    bool check_mac;
    std::function<bool(const KeyId&)> filter;
    std::map<std::string, ManifestEntry>::const_iterator it, end;  // a loaded manifest
    std::unique_ptr<ManifestScanner> scan;                           // a streamed one
    bool done = false;

    std::optional<std::pair<std::string, ManifestEntry>> next_entry(bool parse = true) {
        for (;;) {
            auto e = next_any(parse);
            if (!e || !filter || filter(KeyId::parse(e->first))) return e;
        }
    }
    // parse false: a streamed entry has only its key id (the ring is being skipped).
    std::optional<std::pair<std::string, ManifestEntry>> next_any(bool parse) {
        if (done) return std::nullopt;
        if (!scan) {
            if (it == end) {
                done = true;
                return std::nullopt;
            }
            auto e = *it;
            ++it;
            return e;
        }
        auto changed = [] {
            return IntegrityError("the manifest changed while the store was being read",
                                  "another program wrote to the store without its lock; check it with "
                                  "'keywarden keystore verify'");
        };
        std::optional<std::pair<std::string, ManifestEntry>> e;
        try {
            if (parse) e = scan->next();
            else if (auto id = scan->skip_next()) {
                KeyId::parse(*id);  // as next() checks it: a bad one means the file changed
                e.emplace(std::move(*id), ManifestEntry{});
            }
        } catch (const Error&) {
            throw changed();  // it parsed at open, so its bytes are not those any more
        }
        if (!e) {
            // What was just read must be what the MAC covered at open.
            if (!same_bytes(scan->sha256(), store->m_streamed->sha256)) throw changed();
            done = true;
        }
        return e;
    }
};

KeyStore::RingCursor::RingCursor(std::unique_ptr<State> s) : m(std::move(s)) {}
KeyStore::RingCursor::RingCursor(RingCursor&&) noexcept = default;
KeyStore::RingCursor::~RingCursor() = default;

std::optional<KeyRing> KeyStore::RingCursor::next() {
    auto e = m->next_entry();
    if (!e) return std::nullopt;
    return m->store->load_entry(KeyId::parse(e->first), e->second.file, e->second.sha256, m->check_mac);
}

bool KeyStore::RingCursor::skip() { return m->next_entry(false).has_value(); }

KeyStore::RingCursor KeyStore::rings(bool check_mac, std::function<bool(const KeyId&)> filter) const {
    auto st = std::make_unique<RingCursor::State>();
    st->store = this;
    st->check_mac = check_mac;
    st->filter = std::move(filter);
    if (m_streamed) {
        auto in = m_storage->open_reader(kManifestFile);
        if (!in) throw IntegrityError("the signed manifest is missing from " + m_storage->describe());
        st->scan = std::make_unique<ManifestScanner>(std::move(in), nullptr, kManifestDomain, m_meta.store_id);
    } else {
        st->it = manifest().data.rings.begin();
        st->end = manifest().data.rings.end();
    }
    return RingCursor(std::move(st));
}

std::map<RingKind, KeyStore::Counts> KeyStore::counts_by_kind() const {
    if (m_streamed) return m_streamed->counts;
    std::map<RingKind, Counts> out;
    for (const auto& [id, e] : manifest().data.rings) {
        auto& c = out[e.summary.kind];
        ++c.rings;
        c.versions += e.summary.versions.size();
    }
    return out;
}

// ---- verify ---------------------------------------------------------------------------------

VerifyReport KeyStore::verify(const std::function<void(std::size_t)>& progress) const {
    VerifyReport rep;
    rep.problems = m_file_problems;
    std::size_t i = 0;
    for (const auto& [idstr, entry] : manifest().data.rings) {
        ++rep.rings;
        KeyId id = KeyId::parse(idstr);
        try {
            KeyRing r = load(id);
            if (!same_summary(summarize(r), entry.summary))
                throw IntegrityError("the ring differs from its summary in the manifest");
            check_ring_keys(m_keys, r, rep);
        } catch (const Error& e) {
            rep.problems.push_back({idstr, e.what()});
        }
        if (progress) progress(++i);
    }
    return rep;
}

}  // namespace keywarden::keystore
