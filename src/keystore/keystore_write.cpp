// SPDX-License-Identifier: Apache-2.0
// Key store v2 writing: generate, destroy, staged rings and their commit, bulk filling of a new
// store (import --init).
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
using util::same_bytes;
using util::to_bytes;

// ---- writing --------------------------------------------------------------------------------

KeyVersion KeyStore::make_version(const KeyId& id, std::uint32_t number, std::int64_t now) {
    return make_key_version(m_keys, id, number, now);
}

void KeyStore::generate(const std::vector<KeyId>& ids,
                        const std::function<void(std::size_t)>& progress) {
    if (!m_writable) throw Error("internal: store opened read-only");
    std::set<std::string> seen;
    for (const auto& id : ids)
        if (!seen.insert(id.str()).second)
            throw UsageError("key id " + id.str() + " appears twice in one request");
    std::vector<KeyRing> rings;
    rings.reserve(ids.size());
    std::int64_t now = now_seconds();
    for (std::size_t i = 0; i < ids.size(); ++i) {
        const KeyId& id = ids[i];
        KeyRing r;
        if (contains(id)) {
            r = load(id);
        } else {
            r.id = id;
        }
        add_current_version(m_keys, r, now);
        rings.push_back(std::move(r));
        if (progress) progress(i + 1);
    }
    commit(rings);
}

void KeyStore::destroy(const KeyId& id, std::optional<std::uint32_t> version) {
    if (!m_writable) throw Error("internal: store opened read-only");
    KeyRing r = load(id);
    destroy_versions(r, version, now_seconds());
    commit({r});
}

Bytes KeyStore::seal_ring(const KeyRing& r) {
    return seal(*m_keys.mac, kRingMagic, kRingFormat, kRingDomain,
                ring_binding(m_meta.store_id, r.id), ring_body(r, m_meta.store_id));
}

namespace {
// A sealed ring written, without a sync, under its file name plus `suffix`; its record names the
// file without the suffix.
KeyStore::PendingRing write_ring_file(Storage& storage, const KeyRing& r, const Bytes& file, const char* suffix) {
    std::string name = r.id.file();
    storage.write_unsynced(name + suffix, file);
    return {r.id.str(), name, hex_digest(file), summarize(r)};
}
}  // namespace

// Every changed ring goes into "<file>.pending", without a sync per file.
KeyStore::PendingRing KeyStore::store_sealed(const KeyRing& r, const Bytes& file) {
    return write_ring_file(*m_storage, r, file, kPending);
}

KeyStore::PendingRing KeyStore::store_final(const KeyRing& r, const Bytes& file) {
    return write_ring_file(*m_storage, r, file, "");
}

void KeyStore::adopt_pending(const PendingRing& p) {
    if (!m_writable) throw Error("internal: store opened read-only");
    if (p.file != KeyId::parse(p.key_id).file()) throw Error("internal: pending ring names a wrong file");
    if (!m_staged) {
        m_staged = std::make_unique<Manifest>(manifest());
        m_staged_files.clear();
    }
    m_staged->data.rings[p.key_id] = {p.file, p.sha256, p.summary};
    m_staged_files.push_back(p.file);
}

void KeyStore::stage(const KeyRing& r) {
    if (!m_writable) throw Error("internal: store opened read-only");
    adopt_pending(store_sealed(r, seal_ring(r)));
}

void KeyStore::commit_staged() {
    if (!m_staged) return;
    ManifestData next = std::move(m_staged->data);
    m_staged.reset();
    // One sync makes every pending file durable before the manifest can name it.
    m_storage->sync();
    // The commit point: the signed manifest, written atomically.
    next.generation += 1;
    m_storage->write(kManifestFile, seal(*m_keys.mac, kManifestMagic, kManifestFormat,
                                         kManifestDomain, m_meta.store_id, manifest_body(next)));
    manifest().data = std::move(next);
    // Move the pending files into place. A crash here is finished by the next writer.
    for (const auto& f : m_staged_files) {
        m_storage->rename(f + kPending, f);
        manifest().pending.erase(f);
    }
    m_staged_files.clear();
}

// ---- bulk writing into an empty store -----------------------------------------------------------

// Writer's fill mode: rings under their final names, the manifest streamed at commit().
class KeyStore::BulkWriter {
public:
    ~BulkWriter();
    // A ring written under its final name (store_final), by its record; with `text`, that
    // record's pending_text() as read back.
    void add_written(const PendingRing& p, std::string text = {});
    void commit();

private:
    friend class KeyStore;
    struct State;
    explicit BulkWriter(std::unique_ptr<State> s);
    std::unique_ptr<State> m;
};

struct KeyStore::BulkWriter::State {
    KeyStore* store = nullptr;
    std::FILE* scratch = nullptr;  // one member per line, in key id order
    std::string last_id;
    bool sorted = true;
    std::map<std::string, std::string> members;  // out of order: here instead
    std::uint64_t bytes = 0;                     // of the members, without separators
    std::size_t count = 0;
    bool committed = false;

    // Notes one ring's manifest member, from its entry or as its text.
    void member(const std::string& id, const ManifestEntry& entry);
    void member(const std::string& id, std::string text);
    ~State() {
        if (scratch) std::fclose(scratch);
    }
    // Every member in key id order, each handed to f.
    void each(const std::function<void(const std::string&)>& f) {
        if (!sorted) {
            for (const auto& [id, text] : members) f(text);
            return;
        }
        if (std::fflush(scratch) != 0 || std::fseek(scratch, 0, SEEK_SET) != 0)
            throw Error(std::string("cannot write the import's scratch file beside the store: ") + std::strerror(errno),
                        "free space on the file system that holds the store (nothing was changed)");
        char* line = nullptr;
        std::size_t cap = 0;
        ssize_t n;
        try {
            while ((n = ::getline(&line, &cap, scratch)) > 0) f(std::string(line, static_cast<std::size_t>(n) - 1));
        } catch (...) {
            std::free(line);
            throw;
        }
        std::free(line);
        if (std::ferror(scratch)) throw Error("cannot read back the scratch file of the import");
    }
};

KeyStore::BulkWriter::BulkWriter(std::unique_ptr<State> s) : m(std::move(s)) {}
KeyStore::BulkWriter::~BulkWriter() = default;

std::unique_ptr<KeyStore::BulkWriter> KeyStore::bulk_writer(const std::string& scratch_dir) {
    if (!m_writable) throw Error("internal: store opened read-only");
    if (!manifest().data.rings.empty() || m_staged) throw Error("internal: bulk writing needs an empty store");
    auto st = std::make_unique<BulkWriter::State>();
    st->store = this;
    int fd = ::open(scratch_dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        // No O_TMPFILE on this file system: a named file, unlinked at once.
        std::string name = scratch_dir + "/.kw-manifest-XXXXXX";
        fd = ::mkostemp(name.data(), O_CLOEXEC);
        if (fd >= 0) ::unlink(name.c_str());
    }
    if (fd < 0) throw Error("cannot create a scratch file in " + scratch_dir + ": " + std::strerror(errno));
    st->scratch = ::fdopen(fd, "w+");
    if (!st->scratch) {
        ::close(fd);
        throw Error("cannot open a scratch file");
    }
    return std::unique_ptr<BulkWriter>(new BulkWriter(std::move(st)));
}

void KeyStore::BulkWriter::add_written(const PendingRing& p, std::string text) {
    if (m->committed) throw Error("internal: bulk writer already committed");
    if (p.file != KeyId::parse(p.key_id).file()) throw Error("internal: a written ring names a wrong file");
    if (text.empty()) m->member(p.key_id, ManifestEntry{p.file, p.sha256, p.summary});
    else m->member(p.key_id, std::move(text));
}

void KeyStore::BulkWriter::State::member(const std::string& id, const ManifestEntry& entry) {
    member(id, manifest_member(id, entry));
}

void KeyStore::BulkWriter::State::member(const std::string& id, std::string text) {
    if (sorted && !last_id.empty() && !(last_id < id)) {
        if (last_id == id) throw IntegrityError("key ring " + id + " appears twice");
        // Out of order: from here on the members are kept in memory.
        each([&](const std::string& earlier) {
            // The member starts with its key id as a JSON string (written by manifest_member).
            auto name = member_name(earlier);
            if (!name) throw Error("internal: a bad manifest member in the import's scratch file");
            members.emplace(std::move(name->first), earlier);
        });
        sorted = false;
    }
    if (sorted) {
        if (std::fwrite(text.data(), 1, text.size(), scratch) != text.size() || std::fputc('\n', scratch) == EOF)
            throw Error(std::string("cannot write the import's scratch file beside the store: ") + std::strerror(errno),
                        "free space on the file system that holds the store (nothing was changed)");
        last_id = id;
    } else if (!members.emplace(id, text).second) {
        throw IntegrityError("key ring " + id + " appears twice");
    }
    bytes += text.size();
    ++count;
}

namespace {
constexpr std::size_t kCommitPiece = 64 * 1024;
}  // namespace

void KeyStore::BulkWriter::commit() {
    if (m->committed) throw Error("internal: bulk writer already committed");
    KeyStore& ks = *m->store;
    if (ks.m_staged) throw Error("internal: rings were staged besides the bulk writer");
    // One sync makes every ring file durable before the manifest can name it.
    ks.m_storage->sync();
    ManifestData next;
    next.store_id = ks.manifest().data.store_id;
    next.meta_sha256 = ks.manifest().data.meta_sha256;
    next.generation = ks.manifest().data.generation + 1;
    const std::string prefix = manifest_prefix(next), suffix = manifest_suffix(next);
    std::uint64_t body = prefix.size() + m->bytes + (m->count ? m->count - 1 : 0) + suffix.size();
    if (body > 0xffffffffu) throw Error("the manifest would exceed 4 GiB");
    Bytes header = frame_header(kManifestMagic, kManifestFormat, static_cast<std::uint32_t>(body));
    auto bytes = [](const std::string& t) {
        return std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(t.data()), t.size());
    };
    static const std::uint8_t comma = ',';
    // The body to f, twice: once for the MAC and once for the file. Members are gathered into
    // 64 KiB pieces, so that neither the token nor the file system sees three calls per ring.
    Bytes piece;
    piece.reserve(kCommitPiece);
    auto produce = [&](const Storage::Sink& f) {
        piece.clear();
        auto add = [&](std::span<const std::uint8_t> b) {
            if (piece.size() + b.size() > kCommitPiece && !piece.empty()) {
                f(piece);
                piece.clear();
            }
            if (b.size() >= kCommitPiece) f(b);
            else piece.insert(piece.end(), b.begin(), b.end());
        };
        add(header);
        add(bytes(prefix));
        bool first = true;
        m->each([&](const std::string& text) {
            if (!first) add({&comma, 1});
            first = false;
            add(bytes(text));
        });
        add(bytes(suffix));
        if (!piece.empty()) f(piece);
    };
    auto mac = ks.m_keys.mac->stream();
    for (auto piece : mac_parts_of(kManifestDomain, ks.m_meta.store_id, {})) mac->update(piece);
    produce([&](std::span<const std::uint8_t> piece) { mac->update(piece); });
    Bytes tag = mac->final();
    // The commit point: the signed manifest, written atomically.
    ks.m_storage->write_streamed(kManifestFile, [&](const Storage::Sink& f) {
        produce(f);
        f(tag);
    });
    m->committed = true;
    // This store's manifest in memory is out of date: it is closed for further use.
    ks.m_manifest.reset();
}

void KeyStore::abort_staged() noexcept {
    if (!m_staged) return;
    m_staged.reset();
    for (const auto& f : m_staged_files) {
        try {
            if (!manifest().pending.count(f)) m_storage->remove(f + kPending);
        } catch (...) {
            // Left for the next writer, which removes uncommitted pending files.
        }
    }
    m_staged_files.clear();
}

void KeyStore::commit(const std::vector<KeyRing>& rings) {
    for (const auto& r : rings) stage(r);
    commit_staged();
}

// ---- Writer: the one way to write rings --------------------------------------------------------

struct KeyStore::Writer::State {
    State(KeyStore& s, Mode md, bool p) : store(s), mode(md), part(p) {}
    KeyStore& store;
    Mode mode;
    bool part;  // a worker's: seal and write only
    std::unique_ptr<BulkWriter> bulk;  // fill
    bool committed = false;
};

KeyStore::Writer::Writer(std::unique_ptr<State> s) : m(std::move(s)) {}

KeyStore::Writer::~Writer() {
    // Not committed: an update's pending files go (the store is as it was). A fill's files are in
    // a private staging copy that its owner removes.
    if (!m->part && !m->committed && m->mode == Mode::update) m->store.abort_staged();
}

std::unique_ptr<KeyStore::Writer> KeyStore::writer(Writer::Mode mode, const std::string& scratch_dir) {
    if (!m_writable) throw Error("internal: store opened read-only");
    auto st = std::make_unique<Writer::State>(*this, mode, false);
    if (mode == Writer::Mode::fill) st->bulk = bulk_writer(scratch_dir);
    return std::unique_ptr<Writer>(new Writer(std::move(st)));
}

std::unique_ptr<KeyStore::Writer> KeyStore::part_writer(Writer::Mode mode) {
    auto st = std::make_unique<Writer::State>(*this, mode, true);
    return std::unique_ptr<Writer>(new Writer(std::move(st)));
}

Bytes KeyStore::Writer::seal(const KeyRing& ring) { return m->store.seal_ring(ring); }

KeyStore::PendingRing KeyStore::Writer::write(const KeyRing& ring, const Bytes& sealed) {
    return m->mode == Mode::fill ? m->store.store_final(ring, sealed) : m->store.store_sealed(ring, sealed);
}

void KeyStore::Writer::take(const PendingRing& p, std::string text) {
    if (m->part) throw Error("internal: a part writer takes nothing");
    if (m->committed) throw Error("internal: writer already committed");
    if (m->bulk) m->bulk->add_written(p, std::move(text));
    else m->store.adopt_pending(p);
}

void KeyStore::Writer::put(const KeyRing& ring) { take(write(ring, seal(ring))); }

void KeyStore::Writer::commit() {
    if (m->part) throw Error("internal: a part writer commits nothing");
    if (m->committed) throw Error("internal: writer already committed");
    if (m->bulk) m->bulk->commit();
    else m->store.commit_staged();
    m->committed = true;
}

}  // namespace keywarden::keystore
