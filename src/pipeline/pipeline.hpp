// SPDX-License-Identifier: Apache-2.0
// The token pipeline: a command's work cut into chunks and run in this process (one job) or in
// N forked worker processes, each with its own module state, session and login, with their output
// lines merged in chunk order. Below the backup and key-store commands; above pkcs11.
// docs/architecture.md, "The token pipeline", says how a command plugs in.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keywarden/error.hpp"
#include "keywarden/token_context.hpp"
#include "util/file_io.hpp"

namespace keywarden::pipeline {

using pkcs11::TokenContext;

// Runs `work` in `jobs` child processes, each with its own module state, session and login on
// the same token. SoftHSM serialises every call inside one process, so parallel work on it needs
// processes (see shared/PKCS11-NOTES.md). Each child starts the module afresh
// (Module::restart), finds the token again by serial and logs in with the
// parent's PIN. Waits for all; throws the first child's error with its exit code and hint.
// `meanwhile(running)`, if given, runs in the parent once every child is started, so the
// parent can take in the children's results as they come (see SharedWork): running() is false
// once every child has exited. If it throws, every child is still waited for, and then its
// error is thrown (a child's failure takes precedence).
void run_in_processes(const TokenContext& parent, std::size_t jobs,
                      const std::function<void(std::size_t index, TokenContext& child)>& work,
                      const std::function<void(const std::function<bool()>& running)>& meanwhile = {});

// Work for run_in_processes' children, handed out in chunks as each child asks for the next, so
// that a child on a slower or busier core takes fewer (an even split waits for the slowest
// child). Chunks shrink as the work runs out (each is 1/(8 jobs) of what is left, rounded up),
// so the children end within a few items of each other. The parent makes it before the
// children are forked (the counter is in shared memory). claim() gives out chunks in increasing
// order, so a child that reads its input in order only ever skips forward. A child records where
// it put a chunk's output (offset and length in its own file); the parent reads them back in
// chunk order, while the children run (run_in_processes' meanwhile) or after. After stop()
// (a child or the parent failed; see StopOnError) claim() gives out nothing more.
class SharedWork {
public:
    SharedWork(std::size_t items, std::size_t jobs);
    ~SharedWork();
    SharedWork(const SharedWork&) = delete;
    SharedWork& operator=(const SharedWork&) = delete;

    struct Chunk {
        std::size_t index, first, last;  // items [first, last)
    };
    std::optional<Chunk> claim();
    std::size_t chunks() const noexcept { return m_chunks; }
    void stop() noexcept;
    // Calls stop() if its scope is left by an exception: the other children then end after
    // their current chunk instead of doing all the rest before the error is reported.
    class StopOnError {
    public:
        explicit StopOnError(SharedWork& w) : m_work(w), m_uncaught(std::uncaught_exceptions()) {}
        ~StopOnError();
        StopOnError(const StopOnError&) = delete;
        StopOnError& operator=(const StopOnError&) = delete;

    private:
        SharedWork& m_work;
        int m_uncaught;
    };

    struct Output {
        std::size_t child = 0;
        std::uint64_t offset = 0, length = 0;
    };
    // In the child, once the chunk's output is in its file (written, not just buffered).
    void record(std::size_t chunk, std::size_t child, std::uint64_t offset, std::uint64_t length);
    // In the parent: whether a child has recorded the chunk; and where its output is (throws
    // Error if no child recorded it).
    bool recorded(std::size_t chunk) const;
    Output output(std::size_t chunk) const;

private:
    std::vector<std::size_t> m_starts;  // chunk c is items [m_starts[c], m_starts[c + 1])
    std::size_t m_chunks, m_bytes;
    void* m_shared;
};

// A private directory beside `near` for worker output; removed with everything in it. Its
// ".lock" is flocked while it exists (forked workers share the lock), so that a later run can
// tell it from one a killed run left behind (remove_stale_leftovers).
class TempDir {
public:
    TempDir(const std::string& near, const char* what);
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::string& path() const { return m_path; }

private:
    std::string m_path;
    io::Fd m_lock;
};

// A work file inside a TempDir (a --jobs worker's part of the output): created with O_EXCL and
// mode 0600, written through a buffer; flush() makes what was written readable by another
// process. Not synced: the result it goes into is.
class PartFile {
public:
    explicit PartFile(std::string path);
    PartFile(const PartFile&) = delete;
    PartFile& operator=(const PartFile&) = delete;
    void write(std::string_view s) {
        m_buf.append(s);
        if (m_buf.size() >= (1u << 16)) flush();
    }
    void flush() {
        io::write_all(m_fd.get(), m_buf, m_path);
        m_bytes += m_buf.size();
        m_buf.clear();
    }
    std::uint64_t bytes() const { return m_bytes + m_buf.size(); }

private:
    std::string m_path, m_buf;
    io::Fd m_fd;
    std::uint64_t m_bytes = 0;
};

// The chunks that --jobs workers recorded (SharedWork), read back from their part files
// in chunk order: in pieces of at most 64 KiB (memory stays flat), one call per line.
class ChunkLines {
public:
    ChunkLines(const SharedWork& work, std::function<std::string(std::size_t)> file_of)
        : m_work(work), m_file_of(std::move(file_of)) {}
    ChunkLines(const ChunkLines&) = delete;
    ChunkLines& operator=(const ChunkLines&) = delete;

    // Waits until chunk i is recorded (checking every 2 ms); false if every worker has ended
    // without it: one failed, and run_in_processes reports it.
    bool wait(std::size_t i, const std::function<bool()>& running) const;
    // Calls `line` on every line of chunk i, in order.
    void read(std::size_t i, const std::function<void(std::string_view)>& line);

private:
    const SharedWork& m_work;
    std::function<std::string(std::size_t)> m_file_of;
    std::map<std::size_t, io::Fd> m_fds;
    std::string m_piece;
};

// ---- the pipeline ---------------------------------------------------------------------------

// What one worker sees: its token, the chunks it takes and where its output lines go. With one
// job the worker is this process, its token is the caller's and it gets one chunk of every item;
// with more, it is a forked child with a token of its own (restarted, logged in again) and takes
// chunks from a SharedWork as it goes.
class Worker {
public:
    virtual ~Worker() = default;
    std::size_t index() const noexcept { return m_index; }
    TokenContext& token() noexcept { return m_token; }
    // True in a forked child: whatever the command bound to the caller's session (master keys, a
    // backup key) must be bound again on token().
    virtual bool forked() const noexcept = 0;
    // The next chunk of items to do, in increasing order; ends the previous chunk (its output is
    // then readable by the merge). nullopt when there is no more.
    virtual std::optional<SharedWork::Chunk> next() = 0;
    // One output line of the current chunk, without its '\n' (and containing none).
    virtual void emit(std::string_view line) = 0;

protected:
    Worker(std::size_t index, TokenContext& token) : m_index(index), m_token(token) {}

private:
    std::size_t m_index;
    TokenContext& m_token;
};

struct Plan {
    std::size_t items = 0;  // numbered 0 .. items - 1 (rings, entries)
    std::size_t jobs = 1;   // 1: in this process, no fork; more: at most `items` children
    // With more than one job: the workers' part files go in a private directory beside this path
    // (".<name>.<what>-XXXXXX", removed at the end, found by remove_stale_leftovers if killed).
    std::string work_near;
    const char* what = "parts";
};

// Runs `work` once per worker and `merge` in this process on every emitted line, in item order
// (chunk order), while the workers run. One job takes the same path as N: the same `work` and
// `merge`, with `emit` calling `merge` directly. A worker's error is thrown here with its exit
// code and hint (after every worker has ended); so is an error from `merge`.
void run(TokenContext& token, const Plan& plan, const std::function<void(Worker&)>& work,
         const std::function<void(std::string_view line)>& merge);

}  // namespace keywarden::pipeline
