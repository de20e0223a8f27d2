// SPDX-License-Identifier: Apache-2.0
// Pieces shared by the v2 backups (backup.cpp) and the v1 backup (backup_v1.cpp).
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <filesystem>
#include <functional>
#include <set>
#include <string>

#include "bundle_io.hpp"
#include "keywarden/backup.hpp"
#include "keywarden/error.hpp"
#include "keywarden/planned_keys.hpp"
#include "keywarden/token_context.hpp"
#include "keywarden/token_protector.hpp"
#include "util/bytes.hpp"
#include "pipeline/pipeline.hpp"
#include "util/file_io.hpp"

namespace keywarden::backup::detail {

namespace fs = std::filesystem;

double seconds_since(std::chrono::steady_clock::time_point t0);
// Constant-time comparison of check values and MACs (util/bytes.hpp).
using util::same_bytes;
using pipeline::PartFile;
using pipeline::TempDir;

// What a killed export, verify or import leaves beside `path`: ".<name>.tmp-XXXXXX" files
// (ExclusiveFile) and ".<name>.parts|verify|import-XXXXXX" work directories (TempDir). A live run
// holds an flock on each (the file itself; the directory's ".lock"), and anything changed less
// than a minute ago is left alone (a run that has just made it may not hold the lock yet). The
// others, if they belong to this user, are removed, with a note on stderr.
void remove_stale_leftovers(const std::string& path);
// An absolute path with its directory resolved, to compare two output paths.
std::string canonical_target(const std::string& p);
// Refuses a missing path, bundle == secret (after resolving links in the directories), an
// output that exists, and a directory that does not: before anything is made.
void refuse_outputs(const std::string& bundle, const std::string& secret);
// One output path: refused when it exists (or is a link) or its directory does not.
void refuse_output(const std::string& path);

// A readable AES (encryption) or generic-secret session key generated in the token.
pkcs11::SessionObject make_backup_key(pkcs11::Session& s, bool encryption);
// An AES backup key from its value, as a session object that can unwrap, or wrap.
pkcs11::SessionObject load_backup_key(pkcs11::Session& s, const SecureBytes& value, bool wrap = false);

class HeldElsewhere : public keystore::StorageLock {};  // the caller holds the real lock

// The backup encryption key as a session object, with the protector and the check-value backend
// that use it. rebind() makes them again on the context's current session: after a token
// restart (pkcs11::TokenRecycler) the old ones are gone.
class TokenBackupKey {
public:
    TokenBackupKey(pkcs11::TokenContext& token, const SecureBytes& value, CK_MECHANISM_TYPE mech, bool wrap = false)
        : m_token(token), m_value(value), m_mech(mech), m_wrap(wrap) {
        rebind();
    }
    void rebind() {
        m_key = load_backup_key(*m_token.session, m_value, m_wrap);
        m_under = std::make_unique<pkcs11::AesWrapProtector>(m_token.session, m_key.handle(), m_mech);
        m_backend = std::make_unique<pkcs11::TokenKeyBackend>(m_token.session);
    }
    pkcs11::AesWrapProtector& under() { return *m_under; }
    pkcs11::TokenKeyBackend& backend() { return *m_backend; }

private:
    pkcs11::TokenContext& m_token;
    const SecureBytes& m_value;
    CK_MECHANISM_TYPE m_mech;
    bool m_wrap;
    pkcs11::SessionObject m_key;
    std::unique_ptr<pkcs11::AesWrapProtector> m_under;
    std::unique_ptr<pkcs11::TokenKeyBackend> m_backend;
};

// The entries of `count` rings, in order, each from ring_at(i), every key rewrapped from the
// master key (master.protector) to the backup key in the token. read_ahead: ring_at runs on a
// second thread (it must not use the token). recycler: told after each ring how many temporary
// keys it made; it may restart the token and rebind `master` and `backup`.
void export_entries(const std::function<keystore::KeyRing(std::size_t)>& ring_at, std::size_t count,
                    bool read_ahead, keystore::MasterKeys& master, TokenBackupKey& backup,
                    const SecureBytes& meta_key, bool private_keys,
                    const std::function<void(const std::string&, bool)>& emit,
                    pkcs11::TokenRecycler* recycler = nullptr);
// RFC 5649 wrap mechanism of the token, for bundles; and back from the recorded method name.
CK_MECHANISM_TYPE bundle_mechanism(pkcs11::Session& s);
CK_MECHANISM_TYPE mechanism_of(const std::string& method);

// What an import writes into: for --init only the token (after checking that nothing is at
// path yet); otherwise the existing store of the given version, opened writable unless dry_run,
// and its token.
struct ImportTarget {
    pkcs11::TokenContext token;
    std::optional<keystore::OpenAnyStore> store;
};
ImportTarget open_import_target(const pkcs11::TokenOptions& tok, const std::string& path, bool init,
                                bool dry_run, int store_version);

// Hard links of every file of a store, for a staging copy (files are only ever replaced).
void hardlink_clone(const std::filesystem::path& from, const std::filesystem::path& to);
// A new bundle header: a random bundle id and the time now; the caller fills in the rest.
BundleHeader new_header(pkcs11::Session& s);
// Refuses a token whose wrap mechanism is not the RFC 5649 that `openssl enc -id-aes256-wrap-pad`
// undoes: the protector's key check value must be the one computed on the host.
void check_rfc5649(pkcs11::AesWrapProtector& under_backup, const Bytes& host_kcv, const std::string& mech_name);

// verify_bundle() of the bundle at `bundle_path` (a temp file, for export's self-check), with any
// work directory of --jobs beside `work_near` (the bundle's target), where a later run finds it
// if this one is killed. Does not look for leftovers.
VerifyReport verify_bundle_beside(const std::string& bundle_path, const std::string& work_near,
                                  const SecretFile& secret, pkcs11::TokenContext& token,
                                  const keystore::Store* against, const Progress& progress, std::size_t jobs);

// The first problem of a report that is not ok(): "KEY-ID: PROBLEM" (the problem alone where it
// concerns the whole bundle), and "(and N more problems)" if there are more.
std::string first_problem(const VerifyReport& rep);

// The self-check of an export or a v1 backup: `rep` is the verify of the file just written under
// its temp name, which must hold `entries` entries and `wrapped` keys, all verified. Otherwise
// throws IntegrityError "the WHAT just written does not verify: ..." with the hint for it.
void check_written(const VerifyReport& rep, std::size_t entries, std::size_t wrapped, const std::string& what);

// The drill of an import's dry run: every key of the file at `path` unwrapped under the backup
// key in `token` and its check value checked there, as verify_bundle() does, in this process (so
// nothing is written, not even beside the file). The file must still be the one pass 1 read
// (`bundle_id`, `entries`). Throws IntegrityError naming the first problem, and the refusal the
// import would give too, if any (`refused`); a token failure is thrown as it is. Returns the
// number of keys unwrapped. `what` names the file in messages ("bundle" or "backup").
std::size_t dry_run_unwrap(const std::string& path, const SecretFile& secret, pkcs11::TokenContext& token,
                           const std::string& bundle_id, std::size_t entries, const Progress& progress,
                           const std::string& what, const std::string& refused, const std::string& hint);

// Writes a bundle file: the magic line, the header, the entry lines, then the MAC line over every
// byte before it (HMAC-SHA256 under the signature key). Through an ExclusiveFile: finish() leaves
// it complete under its temp name (temp_path(), to check it there), publish() puts it in place;
// destroyed before that, it is removed. So the file appears complete and checked, or not at all.
class BundleWriter {
public:
    BundleWriter(const std::string& path, std::string_view magic, const BundleHeader& h,
                 const SecureBytes& signature_key);
    ~BundleWriter();
    BundleWriter(const BundleWriter&) = delete;
    BundleWriter& operator=(const BundleWriter&) = delete;
    void line(std::string_view s);
    void finish();
    const std::string& temp_path() const;
    void publish();
    std::uint64_t bytes() const;

private:
    struct State;
    std::unique_ptr<State> m;
};

// The staging directory of an import: a sibling of the store, holding the complete result, switched
// in with one rename at the end. Imports into one path take turns (the store's own lock, or for
// --init a lock file beside where the store will be); leftovers of a killed import are removed,
// and with `token`, an --init import also destroys the master keys a killed --init generated on
// it. Destroyed without switch_in(): the staging directory goes, the target is as it was.
class StagingDir {
public:
    StagingDir(const std::string& store_path, bool init, pkcs11::TokenContext* token = nullptr);
    ~StagingDir();
    StagingDir(const StagingDir&) = delete;
    StagingDir& operator=(const StagingDir&) = delete;
    const std::string& path() const { return m_staging; }
    std::string parent() const { return m_parent.string(); }
    // For --init: the store's init creates the directory itself.
    void make_room_for_init();
    // For --init: makes the init with these params record the master keys it is about to generate
    // in ".<name>.import-keys-XXXXXX" beside the staging directory, until store.json names them
    // (keystore::PlannedKeysRecord). The next --init destroys the keys a killed run recorded.
    void record_planned_keys(keystore::InitParams& p);
    // Otherwise: a hard-linked copy of the live store to add to.
    void clone_live_store();
    // rename() for --init, renameat2(RENAME_EXCHANGE) otherwise; then fsync of the parent.
    void switch_in();
    bool switched() const { return m_switched; }

private:
    std::filesystem::path m_path, m_parent;
    std::string m_staging, m_lock_file;
    bool m_init, m_switched = false;
    std::unique_ptr<keystore::PlannedKeysRecord> m_record;  // --init
    std::unique_ptr<keystore::StorageLock> m_init_lock;
};

// Runs `produce` on a second thread, ahead of the caller, and hands its results over in order:
// SoftHSM serialises token calls, and host work (reading and parsing files, decrypting
// metadata) can meanwhile run on the host's other core. Items travel in batches, so that there
// is one hand-over (and at most one wake-up) per batch, not per item. produce() returns nullopt
// at the end; an exception it throws comes out of next() at the same place. Not threaded when
// `threaded` is false (a producer that uses the token: a PKCS#11 session is for one thread).
template <typename T>
class ReadAhead {
public:
    explicit ReadAhead(std::function<std::optional<T>()> produce, bool threaded = true, std::size_t ahead = 512)
        : m_produce(std::move(produce)), m_threaded(threaded),
          m_max_batches(std::max<std::size_t>(2, ahead / kBatch)) {
        if (m_threaded) m_thread = std::thread([this] {
            ::pthread_setname_np(::pthread_self(), "kw-read-ahead");  // for perf and top -H
            run();
        });
    }
    ~ReadAhead() {
        if (!m_threaded) return;
        {
            std::lock_guard lock(m_mu);
            m_stop = true;
        }
        m_cv.notify_all();
        m_thread.join();
    }
    ReadAhead(const ReadAhead&) = delete;
    ReadAhead& operator=(const ReadAhead&) = delete;

    std::optional<T> next() {
        if (m_finished) return std::nullopt;
        if (!m_threaded) {
            auto v = m_produce();
            m_finished = !v;
            return v;
        }
        if (m_pos == m_current.size()) {
            std::unique_lock lock(m_mu);
            m_cv.wait(lock, [&] { return !m_queue.empty(); });
            bool was_full = m_queue.size() == m_max_batches;
            m_current = std::move(m_queue.front());
            m_queue.pop_front();
            m_pos = 0;
            if (was_full) m_cv.notify_all();
        }
        Item& item = m_current[m_pos++];
        if (item.error) {
            m_finished = true;
            std::rethrow_exception(item.error);
        }
        if (!item.value) m_finished = true;
        return std::move(item.value);
    }

private:
    static constexpr std::size_t kBatch = 64;
    struct Item {
        std::optional<T> value;  // nullopt: the end
        std::exception_ptr error;
    };
    void run() {
        for (bool last = false; !last;) {
            std::vector<Item> batch;
            batch.reserve(kBatch);
            while (batch.size() < kBatch && !last) {
                Item item;
                try {
                    item.value = m_produce();
                } catch (...) {
                    item.error = std::current_exception();
                }
                last = !item.value || item.error;
                batch.push_back(std::move(item));
            }
            std::unique_lock lock(m_mu);
            m_cv.wait(lock, [&] { return m_queue.size() < m_max_batches || m_stop; });
            if (m_stop) return;
            bool was_empty = m_queue.empty();
            m_queue.push_back(std::move(batch));
            if (was_empty) m_cv.notify_all();
        }
    }

    std::function<std::optional<T>()> m_produce;
    bool m_threaded;
    std::size_t m_max_batches;
    std::mutex m_mu;
    std::condition_variable m_cv;
    std::deque<std::vector<Item>> m_queue;
    std::vector<Item> m_current;
    std::size_t m_pos = 0;
    bool m_stop = false, m_finished = false;
    std::thread m_thread;
};

// Rebuilds rings from `count` entries, each key unwrapped under the backup key and wrapped under
// dst's master key in the token; rings named in `skip` are read but not rebuilt. With count ==
// SIZE_MAX the whole rest of the bundle is read, ahead on a second thread. Keys go through the
// token pkcs11::token_batch() at a time; `sink` gets the finished rings in order, several at a
// time (it may move from them). recycler: told after each batch, when no temporary key is held;
// it may restart the token and rebind `backup` and dst's master keys.
void restore_rings(BundleReader& reader, const std::set<std::string>& skip, TokenBackupKey& backup,
                   keystore::Store& dst, std::size_t count,
                   const std::function<void(std::vector<keystore::KeyRing>&)>& sink,
                   const std::function<void()>& tick, pkcs11::TokenRecycler* recycler = nullptr);

// A bundle's entries by position, with one entry of look-back: an import --jobs worker reads
// its chunks through it. next() gives the entry at position() and moves on; put_back() returns
// the entry just read (next() gives it again); skip_to(i) passes over entries (MAC and count
// only) up to position i. restore_rings puts back only an entry that starts a ring.
class EntryCursor {
public:
    // `source`, if given, is where next() takes entries from instead of the reader (a ReadAhead
    // over it, for a cursor that reads every entry); skipping then reads through it too.
    explicit EntryCursor(BundleReader& r, std::function<std::optional<Entry>()> source = nullptr)
        : m_reader(r), m_source(std::move(source)) {}
    std::size_t position() const { return m_at; }
    std::optional<Entry> next();
    void put_back(Entry e);
    void skip_to(std::size_t i);
    // When the cursor is before entry `first` (a chunk's start): skips to entry first - 1 and
    // returns it, the entry whose ring a chunk at `first` may continue. nullopt when the cursor
    // is at `first` already. IntegrityError if the bundle ends before it.
    std::optional<Entry> entry_before(std::size_t first);
    // Passes over the rest, up to and including the MAC check.
    void skip_rest();

private:
    BundleReader& m_reader;
    std::function<std::optional<Entry>()> m_source;
    std::size_t m_at = 0;
    std::optional<Entry> m_back;  // put back: the entry at m_at
};
// The rings that start within entries [position(), last) of `cursor`, rebuilt as restore_rings
// does; the last one may run past `last`. The entry after it, which starts a ring, is put back.
void restore_rings(EntryCursor& cursor, const std::set<std::string>& skip, TokenBackupKey& backup,
                   keystore::Store& dst, std::size_t last,
                   const std::function<void(std::vector<keystore::KeyRing>&)>& sink,
                   pkcs11::TokenRecycler* recycler = nullptr);

// A file written in full or not at all: created beside its target with O_EXCL, linked into
// place at the end (link() refuses to replace an existing file), removed on any failure.
class ExclusiveFile {
public:
    explicit ExclusiveFile(std::string target) : m_target(std::move(target)) {
        fs::path t = fs::absolute(m_target);
        m_temp = (t.parent_path() / ("." + t.filename().string() + ".tmp-XXXXXX")).string();
        m_fd.reset(::mkstemp(m_temp.data()));
        if (!m_fd.valid()) io::fail("cannot create a file beside", m_target);
        ::fchmod(m_fd.get(), 0600);
        // Held while the file is being written: remove_stale_leftovers() leaves it alone.
        ::flock(m_fd.get(), LOCK_EX | LOCK_NB);
    }
    ~ExclusiveFile() {
        m_fd.reset();
        if (!m_temp.empty()) ::unlink(m_temp.c_str());
    }
    ExclusiveFile(const ExclusiveFile&) = delete;
    ExclusiveFile& operator=(const ExclusiveFile&) = delete;
    void write(const void* p, std::size_t n) {
        const auto* b = static_cast<const std::uint8_t*>(p);
        // Buffered: many small lines become few system calls.
        m_buf.insert(m_buf.end(), b, b + n);
        if (m_buf.size() >= (1u << 16)) flush();
    }
    void write(std::string_view s) { write(s.data(), s.size()); }
    // Straight from the caller's memory, never through the buffer (which is not locked, and whose
    // reallocations would leave copies behind): for secrets.
    void write_unbuffered(const void* p, std::size_t n) {
        flush();
        io::write_all(m_fd.get(), std::span(static_cast<const std::uint8_t*>(p), n), m_target);
        m_bytes += n;
    }
    void flush() {
        io::write_all(m_fd.get(), m_buf, m_target);
        m_bytes += m_buf.size();
        wipe(m_buf.data(), m_buf.size());
        m_buf.clear();
    }
    // seal(), then publish().
    void commit() {
        seal();
        publish();
    }
    // Complete under its temp name (temp_path()): flushed, fsynced, closed. Not yet in place; the
    // destructor still removes it.
    void seal() {
        flush();
        if (::fsync(m_fd.get()) != 0) io::fail("cannot sync", m_target);
        if (m_fd.close() != 0) io::fail("cannot close", m_target);
    }
    const std::string& temp_path() const { return m_temp; }
    // Links the sealed file into place; EEXIST means someone created the target meanwhile.
    void publish() {
        if (::link(m_temp.c_str(), m_target.c_str()) != 0) {
            if (errno == EEXIST)
                throw ConflictError(m_target + " already exists", "choose another path; nothing was overwritten");
            io::fail("cannot create", m_target);
        }
        ::unlink(m_temp.c_str());
        m_temp.clear();
        io::fsync_dir_of(m_target);
    }
    std::uint64_t bytes() const { return m_bytes + m_buf.size(); }

private:
    std::string m_target, m_temp;
    io::Fd m_fd;
    std::vector<std::uint8_t> m_buf;
    std::uint64_t m_bytes = 0;
};

}  // namespace keywarden::backup::detail

namespace keywarden::backup {
// The names every backup source file (backup, export, verify, import, backup_v1, migrate) uses.
namespace fs = std::filesystem;
using namespace detail;
using keystore::KeyId;
using keystore::KeyRing;
using keystore::KeyState;
using keystore::KeyVersion;
}  // namespace keywarden::backup
