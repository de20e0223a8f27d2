// SPDX-License-Identifier: Apache-2.0
// import: a bundle restored into a staging directory and switched in whole.
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

// ---- import ---------------------------------------------------------------------------------

namespace detail {

void hardlink_clone(const fs::path& from, const fs::path& to) {
    for (auto it = fs::recursive_directory_iterator(from); it != fs::recursive_directory_iterator(); ++it) {
        fs::path dst = to / fs::relative(it->path(), from);
        if (it->is_directory()) {
            if (::mkdir(dst.c_str(), 0700) != 0 && errno != EEXIST) io::fail("cannot create", dst.string());
        } else if (::link(it->path().c_str(), dst.c_str()) != 0) {
            // Ring files are never changed in place (always replaced by rename), so sharing
            // inodes between the live store and the staging copy is safe.
            io::fail("cannot link", dst.string());
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
// ended the last ring when fewer than all entries are wanted. Over 80 lines on purpose: the
// batch's four token stages (unwrap, check, wrap, destroy) and their error order, described
// above, read best as one loop.
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
                if (!same_bytes(backup.backend().check_value(*keys[i - first], v.public_key), v.kcv))
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

namespace {

// Import's pass 1: the whole bundle verifies before anything is written, and what the import
// would do is counted (rings, entries, conflicts with `store`, what overwrite keeps or would
// lose). Only conflicts are kept in memory. With `mac_only` (a store that --init creates: nothing
// to conflict with) only the whole-file MAC is checked and the counts come from the signed
// header; pass 2 then decrypts each entry once, and anything wrong in an entry stops it before
// the switch.
void scan_bundle(detail::BundleReader& reader, const keystore::Store* store, const ImportOptions& o, bool mac_only,
                 bool overwrite, ImportSummary& sum) {
    if (mac_only) {
        reader.check_mac_only();
        sum.rings = reader.header().rings;
        sum.entries = reader.header().entries;
    } else {
        std::string last;
        // The versions of an overwritten ring: check value, and whether the bundle has the key.
        std::map<std::uint32_t, std::pair<Bytes, bool>> in_bundle;
        auto ring_done = [&] {
            if (!overwrite || !store || sum.conflicts.empty() || sum.conflicts.back() != last) return;
            KeyRing old;
            try {
                old = store->load(KeyId::parse(last));
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
                         (!same_bytes(b->second.first, v.kcv) || (!v.wrapped.empty() && !b->second.second)))
                    sum.replaced.push_back(last + "@" + std::to_string(v.version));
            }
        };
        while (auto e = reader.next()) {
            if (e->meta.key_id != last) {
                ring_done();
                in_bundle.clear();
                last = e->meta.key_id;
                ++sum.rings;
                bool conflict = store && store->contains(KeyId::parse(last));
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
}

// Why the import into `store` is refused, if it is (sum.refused and its hint): a store that holds
// keys without --merge, conflicts with --on-conflict abort, or versions overwrite would lose. A
// dry run reports it; a real import throws it.
void refuse_or_note(const keystore::Store& store, const ImportOptions& o, ImportSummary& sum) {
    std::size_t existing = store.key_ids().size();
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

// Pass 2's state: what one import's second pass reads and writes.
struct ImportPass2 {
    const ImportOptions& o;
    ImportSummary& sum;
    const SecretFile& secret;
    CK_MECHANISM_TYPE mech;
    pkcs11::TokenContext& ctx;
    keystore::OpenStore& stage;
    StagingDir& staging_dir;
    const std::set<std::string>& skip;
    bool mac_only, overwrite;
};

// One worker of import's pass 2 (restore_on_pipeline): restores the rings that start in the
// chunks it takes and writes their files with a part writer, one line per ring.
void restore_worker(ImportPass2& run, pipeline::Worker& w, keystore::KeyStore::Writer::Mode mode) {
    const ImportOptions& o = run.o;
    ImportSummary& sum = run.sum;
    const SecretFile& secret = run.secret;
    const CK_MECHANISM_TYPE mech = run.mech;
    pkcs11::TokenContext& ctx = run.ctx;
    const std::string staging = run.staging_dir.path();
    const std::set<std::string>& skip = run.skip;
    const bool overwrite = run.overwrite;
    keystore::OpenStore& stage = run.stage;
    // One job works on the staged store itself, and a restart leaves its master keys and
    // the backup key to be found or made again on the new session (ctx is the context
    // every later step uses). A forked worker opens the staged store on its own session,
    // not strict: the other workers' ring files are not in its manifest yet.
    std::optional<keystore::OpenStore> own_store;
    if (w.forked())
        own_store.emplace(keystore::open_store_on(w.token(), keystore::open_file_storage(staging), false,
                                                  false, std::make_unique<HeldElsewhere>()));
    keystore::OpenStore& mine = own_store ? *own_store : stage;
    TokenBackupKey backup(mine.token, secret.encryption, mech);
    pkcs11::TokenRecycler recycler(w.forked() ? mine.token : ctx, [&] {
        if (!w.forked()) mine.token = ctx;
        keystore::rebind_master_keys(mine);
        backup.rebind();
    });
    detail::BundleReader own(o.bundle_path, secret);
    // One job reads and decrypts every entry: a second thread does that ahead of the token
    // work. A worker of N skips the entries of other workers' chunks without decrypting.
    std::optional<ReadAhead<detail::Entry>> ahead;
    if (!w.forked()) ahead.emplace([&] { return own.next(); });
    EntryCursor cursor(own, ahead ? std::function<std::optional<detail::Entry>()>([&] { return ahead->next(); })
                                  : nullptr);
    // A ring file written, and its line emitted.
    auto part = mine.store->part_writer(mode);
    auto write = [&](const KeyRing& r, const Bytes& file) {
        w.emit(keystore::KeyStore::pending_text(part->write(r, file)));
    };
    std::vector<Bytes> files;
    while (auto chunk = w.next()) {
        std::set<std::string> not_mine = skip;
        // The entry before the chunk names a ring that started before it. Otherwise the
        // entry at the cursor was put back as the start of a ring (at the chunk's first
        // entry, or past it if this worker's last ring ran into the chunk).
        if (auto before = cursor.entry_before(chunk->first)) not_mine.insert(before->meta.key_id);
        // One job writes the ring files (and takes them in) on a second thread while this
        // one does the token work; a worker of N writes them itself (the other core is
        // the other worker's).
        std::optional<RingWriter> writer;
        if (!w.forked()) writer.emplace(write);
        std::size_t wrapped_here = 0;
        restore_rings(cursor, not_mine, backup, *mine.store, chunk->last,
                      [&](std::vector<KeyRing>& rings) {
                          // All signed, then all written: a run of one kind of work is
                          // faster on a busy host than alternating.
                          files.clear();
                          for (auto& r : rings) {
                              for (const auto& v : r.versions) wrapped_here += !v.wrapped.empty();
                              if (overwrite) keep_store_only_versions(r, *mine.store, sum.kept);
                              files.push_back(part->seal(r));
                          }
                          for (std::size_t i = 0; i < rings.size(); ++i) {
                              if (writer) writer->push(std::move(rings[i]), std::move(files[i]));
                              else write(rings[i], files[i]);
                          }
                      },
                      &recycler);
        if (writer) writer->finish();  // every ring of the chunk written and taken in
        w.emit("wrapped " + std::to_string(wrapped_here));
    }
    cursor.skip_rest();
}

// Pass 2 on the token pipeline, one job or N: every key is unwrapped under the backup key in the
// token and wrapped again under the staged store's master key, and the rings are written as
// files; this process takes them into the staged store. Workers take chunks of entries as they
// go (a worker on a slower core takes fewer): a chunk is the rings that start within its entries,
// so a worker reads the entry before a chunk to know the ring it must leave to the chunk before.
// Into a store that --init created, ring files are written under their final names and this
// process adds them to the manifest from the workers' lines (BulkWriter) as chunks are done; a
// merge adopts them (pending files) when every worker is done.
void restore_on_pipeline(ImportPass2& run) {
    const ImportOptions& o = run.o;
    ImportSummary& sum = run.sum;
    const bool mac_only = run.mac_only;
    keystore::KeyStore& dst = *run.stage.store;
    using Writer = keystore::KeyStore::Writer;
    const Writer::Mode mode = o.init ? Writer::Mode::fill : Writer::Mode::update;
    auto writer = dst.writer(mode, run.staging_dir.parent());
    std::size_t wrapped = 0;
    std::vector<keystore::KeyStore::PendingRing> pending;  // a merge's rings, taken at the end
    pipeline::Plan plan;
    plan.items = sum.entries;
    plan.jobs = o.jobs;
    plan.work_near = o.bundle_path;
    plan.what = "import";
    pipeline::run(
        run.ctx, plan,
        [&](pipeline::Worker& w) { restore_worker(run, w, mode); },
        [&](std::string_view text) {
            if (text.starts_with("wrapped ")) {
                wrapped += std::stoull(std::string(text.substr(8)));
                return;
            }
            std::string l(text);
            auto p = keystore::KeyStore::pending_from_text(l);
            ++sum.rings_written;
            sum.entries_written += p.summary.versions.size();
            if (mode == Writer::Mode::fill) writer->take(p, std::move(l));
            else pending.push_back(std::move(p));
            if (o.progress) o.progress(std::min(sum.entries_written, sum.entries), sum.entries);
        });
    for (const auto& p : pending) writer->take(p);
    sum.entries_written -= sum.kept_count();  // the workers' summaries include the kept versions
    if (mac_only) sum.wrapped_keys = wrapped;
    if (mac_only && (sum.entries_written != sum.entries || sum.rings_written != sum.rings))
        throw IntegrityError("the bundle holds other counts than its header says");
    writer->commit();
    if (o.progress) o.progress(sum.entries, sum.entries);
}

// The master keys an --init generated for a store that never came to be: removed, best effort,
// never hiding the error that got us here (after a failed module restart there is no live
// session to remove them with).
void remove_new_master_keys(pkcs11::TokenContext& ctx, const keystore::StoreMeta& meta) {
    for (const auto* r : {&meta.encryption, &meta.signature}) {
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

}  // namespace

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
    scan_bundle(reader, target ? target->store.get() : nullptr, o, mac_only, overwrite, sum);
    std::set<std::string> skip(sum.skipped.begin(), sum.skipped.end());
    if (target) refuse_or_note(*target->store, o, sum);
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
        // Pass 2: the backup key goes into the destination token; every key is unwrapped there
        // and wrapped again under the destination master key. With jobs, worker processes take
        // chunks of entries as they go and write the rings as files; this process adopts them.
        const CK_MECHANISM_TYPE mech = mechanism_of(reader.header().wrap_method);
        ImportPass2 run{o, sum, secret, mech, ctx, *stage, staging_dir, skip, mac_only, overwrite};
        restore_on_pipeline(run);
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
                remove_new_master_keys(ctx, *created_meta);
        }
        throw;
    }
    sum.seconds = seconds_since(t0);
    return sum;
}

}  // namespace keywarden::backup
