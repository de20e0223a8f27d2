// SPDX-License-Identifier: Apache-2.0
// Worker processes (run_in_processes, SharedWork) and the pipeline on them (run).
#include "pipeline/pipeline.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>

#include "keywarden/error.hpp"
#include "keywarden/log.hpp"

namespace keywarden::pipeline {

using pkcs11::restart_token;

// Over 80 lines on purpose: fork, the child's whole life (restart, work, report, _exit) and the
// parent's wait are one protocol, read best in one place.
void run_in_processes(const TokenContext& parent, std::size_t jobs,
                      const std::function<void(std::size_t, TokenContext&)>& work,
                      const std::function<void(const std::function<bool()>&)>& meanwhile) {
    struct Child {
        pid_t pid;
        int fd;
    };
    std::vector<Child> children;
    std::fflush(stdout);
    std::fflush(stderr);
    for (std::size_t k = 0; k < jobs; ++k) {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) throw Error("pipe failed");
        pid_t pid = ::fork();
        if (pid < 0) throw Error("fork failed: " + std::string(std::strerror(errno)));
        if (pid == 0) {
            ::close(p[0]);
            // A worker never outlives its parent: if the parent is killed, so is the worker.
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (::getppid() == 1) ::_exit(1);
            int code = 0;
            std::string report;
            try {
                TokenContext c = parent;
                restart_token(c);
                work(k, c);
            } catch (const Error& e) {
                code = static_cast<int>(e.exit_code());
                report = std::to_string(code) + "\n" + e.what() + "\n" + e.hint();
            } catch (const std::exception& e) {
                code = 1;
                report = "1\n" + std::string(e.what()) + "\n";
            }
            // Capped well below a pipe's buffer: the parent may read it only after meanwhile().
            if (code != 0) io::write_fully(p[1], std::string_view(report).substr(0, 4096));
            // _exit: no destructors, no atexit handlers, no C_Finalize of the parent's state.
            ::_exit(code == 0 ? 0 : 1);
        }
        ::close(p[1]);
        children.push_back({pid, p[0]});
    }
    std::exception_ptr in_meanwhile;  // what meanwhile() threw; every child is still waited for
    if (meanwhile) {
        // Whether any child is still running, without reaping it (its status is read below).
        auto running = [&] {
            for (const auto& c : children) {
                siginfo_t info{};
                if (::waitid(P_PID, static_cast<id_t>(c.pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) continue;
                if (info.si_pid == 0) return true;
            }
            return false;
        };
        try {
            meanwhile(running);
        } catch (...) {
            in_meanwhile = std::current_exception();
        }
    }
    std::optional<Error> first;
    for (std::size_t k = 0; k < children.size(); ++k) {
        auto& c = children[k];
        std::string report = io::read_to_end(c.fd);
        ::close(c.fd);
        int status = 0;
        ::waitpid(c.pid, &status, 0);
        bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (ok || first) continue;
        if (report.empty()) {
            first.emplace("a worker process died (status " + std::to_string(status) + ")");
            continue;
        }
        auto nl1 = report.find('\n');
        auto nl2 = report.find('\n', nl1 + 1);
        int code = std::atoi(report.substr(0, nl1).c_str());
        first.emplace(report.substr(nl1 + 1, nl2 - nl1 - 1),
                      nl2 == std::string::npos ? std::string() : report.substr(nl2 + 1),
                      static_cast<ExitCode>(code));
    }
    if (first) throw *first;
    if (in_meanwhile) std::rethrow_exception(in_meanwhile);
}

namespace {

// The shared block: the next chunk to give out and the stop flag, then one Slot per chunk.
struct SharedBlock {
    std::atomic<std::size_t> next;
    std::atomic<std::uint32_t> stopped;
};
struct Slot {
    std::atomic<std::uint32_t> recorded;  // set last (release), read first (acquire)
    std::uint32_t child;
    std::uint64_t offset, length;
};
static_assert(std::atomic<std::size_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "counters shared between processes");

Slot* slots_of(void* shared) { return reinterpret_cast<Slot*>(static_cast<char*>(shared) + 64); }

}  // namespace

SharedWork::SharedWork(std::size_t items, std::size_t jobs) {
    const std::size_t parts = std::max<std::size_t>(1, jobs) * 8;
    for (std::size_t at = 0; at < items;) {
        m_starts.push_back(at);
        at += (items - at + parts - 1) / parts;
    }
    m_starts.push_back(items);
    m_chunks = m_starts.size() - 1;
    m_bytes = 64 + m_chunks * sizeof(Slot);
    m_shared = ::mmap(nullptr, m_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m_shared == MAP_FAILED)
        throw Error("cannot map memory shared with worker processes: " + std::string(std::strerror(errno)));
    new (m_shared) SharedBlock{0, 0};
    for (std::size_t c = 0; c < m_chunks; ++c) new (slots_of(m_shared) + c) Slot{0, 0, 0, 0};
}

SharedWork::~SharedWork() { ::munmap(m_shared, m_bytes); }

void SharedWork::stop() noexcept { static_cast<SharedBlock*>(m_shared)->stopped.store(1, std::memory_order_relaxed); }

SharedWork::StopOnError::~StopOnError() {
    if (std::uncaught_exceptions() > m_uncaught) m_work.stop();
}

std::optional<SharedWork::Chunk> SharedWork::claim() {
    if (static_cast<SharedBlock*>(m_shared)->stopped.load(std::memory_order_relaxed)) return std::nullopt;
    std::size_t c = static_cast<SharedBlock*>(m_shared)->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= m_chunks) return std::nullopt;
    return Chunk{c, m_starts[c], m_starts[c + 1]};
}

void SharedWork::record(std::size_t chunk, std::size_t child, std::uint64_t offset, std::uint64_t length) {
    if (chunk >= m_chunks) throw Error("internal: no work chunk " + std::to_string(chunk));
    Slot& s = slots_of(m_shared)[chunk];
    s.child = static_cast<std::uint32_t>(child);
    s.offset = offset;
    s.length = length;
    s.recorded.store(1, std::memory_order_release);
}

bool SharedWork::recorded(std::size_t chunk) const {
    return chunk < m_chunks && slots_of(m_shared)[chunk].recorded.load(std::memory_order_acquire) != 0;
}

SharedWork::Output SharedWork::output(std::size_t chunk) const {
    if (!recorded(chunk)) throw Error("internal: no worker recorded its work on chunk " + std::to_string(chunk));
    const Slot& s = slots_of(m_shared)[chunk];
    return Output{s.child, s.offset, s.length};
}

// ---- work files ----------------------------------------------------------------------------

PartFile::PartFile(std::string path) : m_path(std::move(path)) {
    m_fd.reset(::open(m_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!m_fd.valid()) io::fail("cannot create", m_path);
}

TempDir::TempDir(const std::string& near, const char* what) {
    std::filesystem::path t = std::filesystem::absolute(near);
    m_path = (t.parent_path() / ("." + t.filename().string() + "." + what + "-XXXXXX")).string();
    if (!::mkdtemp(m_path.data())) io::fail("cannot create a work directory beside", near);
    m_lock.reset(::open((m_path + "/.lock").c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!m_lock.valid()) {
        int e = errno;
        std::error_code ec;
        std::filesystem::remove_all(m_path, ec);
        errno = e;
        io::fail("cannot create a file in the work directory", m_path);
    }
    // A file system without flock: the directory is then protected only while it is young.
    if (::flock(m_lock.get(), LOCK_EX | LOCK_NB) != 0)
        log::debug("no lock on " + m_path + ": " + std::strerror(errno));
}
TempDir::~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(m_path, ec);
    m_lock.reset();
}

bool ChunkLines::wait(std::size_t i, const std::function<bool()>& running) const {
    while (!m_work.recorded(i)) {
        if (!running() && !m_work.recorded(i)) return false;
        ::usleep(2000);
    }
    return true;
}
void ChunkLines::read(std::size_t i, const std::function<void(std::string_view)>& line) {
    auto got = m_work.output(i);
    const std::string name = m_file_of(got.child);  // for errors
    auto it = m_fds.find(got.child);
    if (it == m_fds.end()) {
        io::Fd fd(::open(name.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd.valid()) io::fail("cannot open the work file", name);
        it = m_fds.emplace(got.child, std::move(fd)).first;
    }
    // A line cut at the end of a piece is completed by the next.
    m_piece.clear();
    for (std::uint64_t done = 0; done < got.length;) {
        std::size_t keep = m_piece.size();
        std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(got.length - done, 1u << 16));
        m_piece.resize(keep + want);
        ssize_t r = ::pread(it->second.get(), m_piece.data() + keep, want, static_cast<off_t>(got.offset + done));
        if (r < 0 && errno == EINTR) {
            m_piece.resize(keep);
            continue;
        }
        if (r < 0) io::fail("cannot read the work file", name);
        if (r == 0) throw Error("internal: the work file " + name + " is short");
        m_piece.resize(keep + static_cast<std::size_t>(r));
        done += static_cast<std::uint64_t>(r);
        std::size_t p = 0;
        for (std::size_t nl; (nl = m_piece.find('\n', p)) != std::string::npos; p = nl + 1)
            line(std::string_view(m_piece.data() + p, nl - p));
        m_piece.erase(0, p);
    }
    if (!m_piece.empty()) throw Error("internal: a chunk in " + name + " ends inside a line");
}

// ---- the pipeline ---------------------------------------------------------------------------

namespace {

// One job: this process, one chunk of every item, lines straight to the merge.
class InProcess final : public Worker {
public:
    InProcess(TokenContext& token, std::size_t items, const std::function<void(std::string_view)>& merge)
        : Worker(0, token), m_items(items), m_merge(merge) {}
    bool forked() const noexcept override { return false; }
    std::optional<SharedWork::Chunk> next() override {
        if (m_given) return std::nullopt;
        m_given = true;
        return SharedWork::Chunk{0, 0, m_items};
    }
    void emit(std::string_view line) override { m_merge(line); }

private:
    std::size_t m_items;
    const std::function<void(std::string_view)>& m_merge;
    bool m_given = false;
};

// A forked child: chunks from the shared counter, lines into its part file, each chunk recorded
// once its lines are in the file.
class InChild final : public Worker {
public:
    InChild(std::size_t k, TokenContext& token, SharedWork& work, const std::string& part)
        : Worker(k, token), m_work(work), m_part(part) {}
    bool forked() const noexcept override { return true; }
    std::optional<SharedWork::Chunk> next() override {
        finish();
        m_chunk = m_work.claim();
        m_start = m_part.bytes();
        return m_chunk;
    }
    void emit(std::string_view line) override {
        m_part.write(line);
        m_part.write("\n");
    }
    // Records the current chunk, if any.
    void finish() {
        if (!m_chunk) return;
        m_part.flush();
        m_work.record(m_chunk->index, index(), m_start, m_part.bytes() - m_start);
        m_chunk.reset();
    }

private:
    SharedWork& m_work;
    PartFile m_part;
    std::optional<SharedWork::Chunk> m_chunk;
    std::uint64_t m_start = 0;
};

}  // namespace

void run(TokenContext& token, const Plan& plan, const std::function<void(Worker&)>& work,
         const std::function<void(std::string_view line)>& merge) {
    if (plan.jobs <= 1 || plan.items < 2) {
        InProcess w(token, plan.items, merge);
        work(w);
        return;
    }
    // Worker processes take chunks as they go, so a worker on a slower core takes fewer, and
    // write each chunk's lines to their own part file. Meanwhile this process copies the finished
    // chunks to the merge in order.
    TempDir parts(plan.work_near, plan.what);
    const std::size_t n = std::min(plan.jobs, plan.items);
    SharedWork shared(plan.items, n);
    auto part_name = [&](std::size_t k) { return parts.path() + "/" + std::to_string(k); };
    std::size_t merged = 0;  // chunks merged
    run_in_processes(
        token, n,
        [&](std::size_t k, TokenContext& c) {
            SharedWork::StopOnError stop_on_error(shared);
            InChild w(k, c, shared, part_name(k));
            work(w);
            w.finish();
        },
        [&](const std::function<bool()>& running) {
            SharedWork::StopOnError stop_on_error(shared);
            ChunkLines chunks(shared, part_name);
            for (; merged < shared.chunks() && chunks.wait(merged, running); ++merged) chunks.read(merged, merge);
        });
    if (merged != shared.chunks()) throw Error("internal: a worker left its share of the work undone");
}

}  // namespace keywarden::pipeline
