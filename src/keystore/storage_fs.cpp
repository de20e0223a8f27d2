// SPDX-License-Identifier: Apache-2.0
// The filesystem storage backend.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include "keywarden/error.hpp"
#include "keywarden/storage.hpp"
#include "util/file_io.hpp"

namespace keywarden::keystore {

namespace {

namespace fs = std::filesystem;

std::string errno_text() { return std::strerror(errno); }

using io::Fd;
using io::fsync_dir;
using io::write_all;

class FileLock : public StorageLock {
public:
    explicit FileLock(int fd) : m_fd(fd) {}
    ~FileLock() override { ::flock(m_fd.get(), LOCK_UN); }

private:
    Fd m_fd;
};

class FileStorage : public Storage {
public:
    explicit FileStorage(std::string root) : m_root(std::move(root)) {
        while (m_root.size() > 1 && m_root.back() == '/') m_root.pop_back();
    }

    std::string describe() const override { return m_root; }

    bool exists() const override {
        struct stat st {};
        return ::stat(m_root.c_str(), &st) == 0;
    }

    std::string path(const std::string& name) const {
        // Names come from the key store, which builds them from validated ids; this is a
        // second line of defence against a name reaching outside the store.
        if (name.empty() || name.front() == '/' || name.find("..") != std::string::npos ||
            name.find('\0') != std::string::npos)
            throw Error("refusing a storage name that could leave the store: " + name);
        return m_root + "/" + name;
    }

    std::optional<Bytes> read(const std::string& name) const override {
        std::string p = path(name);
        Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
        if (fd.get() < 0) {
            if (errno == ENOENT) return std::nullopt;
            io::fail("cannot open", p);
        }
        Bytes out;
        struct stat st {};
        if (::fstat(fd.get(), &st) == 0 && st.st_size > 0)
            out.reserve(static_cast<std::size_t>(st.st_size));
        std::uint8_t buf[65536];
        for (;;) {
            ssize_t n = ::read(fd.get(), buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) io::fail("cannot read", p);
            if (n == 0) break;
            out.insert(out.end(), buf, buf + n);
        }
        return out;
    }

    std::unique_ptr<Reader> open_reader(const std::string& name) const override {
        std::string p = path(name);
        Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
        if (fd.get() < 0) {
            if (errno == ENOENT) return nullptr;
            io::fail("cannot open", p);
        }
        struct FdReader : Reader {
            FdReader(int f, std::string path) : fd(f), p(std::move(path)) {}
            Fd fd;
            std::string p;
            std::size_t read(std::uint8_t* out, std::size_t n) override {
                for (;;) {
                    ssize_t got = ::read(fd.get(), out, n);
                    if (got < 0 && errno == EINTR) continue;
                    if (got < 0) io::fail("cannot read", p);
                    return static_cast<std::size_t>(got);
                }
            }
        };
        return std::make_unique<FdReader>(fd.release(), p);
    }

    void make_parents(const std::string& p) {
        std::string dir = p.substr(0, p.rfind('/'));
        if (dir.size() <= m_root.size()) return;
        // Remember the directories seen, so that bulk writes (import) do not pay three mkdir calls
        // per file; remove() forgets the ones it removes. Bounded: with one directory per client,
        // a large import would otherwise hold every client's path (forgetting costs only an
        // mkdir that finds the directory there).
        if (m_known_dirs.count(dir)) return;
        if (m_known_dirs.size() > 1024) m_known_dirs.clear();
        std::string cur = m_root;
        std::string rest = dir.substr(m_root.size() + 1);
        std::size_t start = 0;
        while (start <= rest.size()) {
            std::size_t slash = rest.find('/', start);
            std::string part = rest.substr(start, slash == std::string::npos ? std::string::npos
                                                                              : slash - start);
            cur += "/" + part;
            if (!m_known_dirs.count(cur)) {
                if (::mkdir(cur.c_str(), 0700) != 0 && errno != EEXIST)
                    io::fail("cannot create directory", cur);
                m_known_dirs.insert(cur);
            }
            if (slash == std::string::npos) break;
            start = slash + 1;
        }
        m_known_dirs.insert(dir);
    }

    std::string temp_name(const std::string& p) {
        static thread_local std::mt19937_64 rng{std::random_device{}()};
        char buf[32];
        std::snprintf(buf, sizeof buf, ".tmp-%016llx",
                      static_cast<unsigned long long>(rng()));
        std::string dir = p.substr(0, p.rfind('/'));
        return dir + "/" + buf;
    }

    void put(const std::string& name, const Bytes& data, bool exclusive, bool durable) {
        put_streamed(name, [&](const Sink& sink) { sink(data); }, exclusive, durable);
    }

    void write_streamed(const std::string& name, const std::function<void(const Sink&)>& produce) override {
        put_streamed(name, produce, false, true);
    }

    void put_streamed(const std::string& name, const std::function<void(const Sink&)>& produce, bool exclusive,
                      bool durable) {
        std::string p = path(name);
        make_parents(p);
        std::string tmp = temp_name(p);
        Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
        if (fd.get() < 0) io::fail("cannot create", tmp);
        try {
            produce([&](std::span<const std::uint8_t> piece) { write_all(fd.get(), piece, p); });
            if (durable && ::fsync(fd.get()) != 0) io::fail("cannot sync", p);
            if (::close(fd.release()) != 0) io::fail("cannot close", p);
            if (exclusive) {
                // link() fails with EEXIST instead of replacing: no window where an existing
                // file could be overwritten.
                if (::link(tmp.c_str(), p.c_str()) != 0) {
                    if (errno == EEXIST)
                        throw ConflictError(p + " already exists", "choose another path");
                    io::fail("cannot create", p);
                }
                ::unlink(tmp.c_str());
            } else if (::rename(tmp.c_str(), p.c_str()) != 0) {
                io::fail("cannot rename into place", p);
            }
        } catch (...) {
            ::unlink(tmp.c_str());
            throw;
        }
        if (durable) fsync_dir(p.substr(0, p.rfind('/')));
    }

    void write(const std::string& name, const Bytes& data, bool exclusive) override {
        put(name, data, exclusive, true);
    }

    void write_unsynced(const std::string& name, const Bytes& data) override {
        // Written in place, without a temp file: such files (".pending") are invisible until a
        // later commit names them by digest, so a torn write is simply never adopted.
        std::string p = path(name);
        make_parents(p);
        // A file that exists is unlinked, never truncated: in an import's staging copy it may be
        // a hard link to the live store's file, which must not change.
        constexpr int kFlags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
        int raw = ::open(p.c_str(), kFlags, 0600);
        if (raw < 0 && errno == EEXIST) {
            if (::unlink(p.c_str()) != 0 && errno != ENOENT) io::fail("cannot replace", p);
            raw = ::open(p.c_str(), kFlags, 0600);
        }
        Fd fd(raw);
        if (fd.get() < 0) io::fail("cannot create", p);
        write_all(fd.get(), data, p);
        if (::close(fd.release()) != 0) io::fail("cannot close", p);
    }

    void sync() override {
        Fd fd(::open(m_root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (fd.get() < 0 || ::syncfs(fd.get()) != 0) io::fail("cannot sync", m_root);
    }

    void rename(const std::string& from, const std::string& to) override {
        std::string a = path(from), b = path(to);
        make_parents(b);
        if (::rename(a.c_str(), b.c_str()) != 0) io::fail("cannot rename", a);
    }

    void remove(const std::string& name) override {
        std::string p = path(name);
        if (::unlink(p.c_str()) != 0 && errno != ENOENT) io::fail("cannot remove", p);
        // Directories the removed file leaves empty go too (a client directory that only an
        // aborted write had created), never the root. Only a writer removes, and it holds the
        // store's lock, so no other process is creating files in them meanwhile.
        for (std::string dir = p.substr(0, p.rfind('/')); dir.size() > m_root.size();
             dir = dir.substr(0, dir.rfind('/'))) {
            if (::rmdir(dir.c_str()) != 0) break;
            m_known_dirs.erase(dir);
        }
    }

    void list_dir(const std::string& dir, const std::string& rel,
                  std::vector<std::string>& out) const {
        DIR* d = ::opendir(dir.c_str());
        if (!d) {
            if (errno == ENOENT) return;
            io::fail("cannot list", dir);
        }
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n == "." || n == "..") continue;
            std::string child = rel.empty() ? n : rel + "/" + n;
            bool is_dir = e->d_type == DT_DIR;
            if (e->d_type == DT_UNKNOWN) {
                struct stat st {};
                is_dir = ::lstat((dir + "/" + n).c_str(), &st) == 0 && S_ISDIR(st.st_mode);
            }
            if (is_dir) list_dir(dir + "/" + n, child, out);
            else if (!n.starts_with(".tmp-") && n != ".lock") out.push_back(child);
        }
        ::closedir(d);
    }

    std::vector<std::string> list(const std::string& prefix) const override {
        std::vector<std::string> out;
        std::string dir = prefix.empty() ? m_root : path(prefix);
        list_dir(dir, prefix, out);
        return out;
    }

    std::unique_ptr<StorageLock> lock(bool exclusive) override { return take_lock(".lock", exclusive); }

    std::unique_ptr<StorageLock> lock_file(const std::string& name) override {
        if (name.find('/') != std::string::npos) throw Error("internal: bad lock file name");
        return take_lock(name, true);
    }

    std::unique_ptr<StorageLock> take_lock(const std::string& name, bool exclusive) {
        std::string p = m_root + "/" + name;
        int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0) {
            // A reader without write access to the directory can still lock an existing file.
            fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
            if (fd < 0) io::fail("cannot open lock file", p);
        }
        while (::flock(fd, exclusive ? LOCK_EX : LOCK_SH) != 0) {
            if (errno == EINTR) continue;
            ::close(fd);
            io::fail("cannot lock", p);
        }
        return std::make_unique<FileLock>(fd);
    }

    void create() override {
        if (::mkdir(m_root.c_str(), 0700) != 0) {
            if (errno != EEXIST) {
                if (errno == ENOENT) {
                    create_private_directories(fs::path(m_root).parent_path().string());
                    if (::mkdir(m_root.c_str(), 0700) == 0) return;
                }
                io::fail("cannot create key store directory", m_root);
            }
            std::error_code ec;
            if (!fs::is_directory(m_root, ec))
                throw ConflictError(m_root + " exists and is not a directory",
                                    "choose another --keystore path");
            if (!fs::is_empty(m_root, ec))
                throw ConflictError("refusing to initialise " + m_root +
                                        ": the directory is not empty",
                                    "keywarden init never touches an existing store; choose an "
                                    "empty or new directory");
            ::chmod(m_root.c_str(), 0700);
        }
    }

    void check_permissions() const override {
        struct stat st {};
        if (::stat(m_root.c_str(), &st) != 0)
            throw NotFoundError("no key store at " + m_root + ": " + errno_text(),
                                "create one with 'keywarden init --keystore " + m_root +
                                    "', or point --keystore / KEYWARDEN_KEYSTORE at it");
        if (!S_ISDIR(st.st_mode)) throw NotFoundError(m_root + " is not a directory");
        if (st.st_mode & 022)
            throw Error("key store directory " + m_root + " is writable by group or others",
                        "run: chmod 700 '" + m_root + "'");
    }

private:
    std::string m_root;
    std::set<std::string> m_known_dirs;
};

}  // namespace

void Storage::write_streamed(const std::string& name, const std::function<void(const Sink&)>& produce) {
    Bytes all;
    produce([&](std::span<const std::uint8_t> piece) { all.insert(all.end(), piece.begin(), piece.end()); });
    write(name, all);
}

std::size_t Storage::MemoryReader::read(std::uint8_t* out, std::size_t n) {
    n = std::min(n, m_data.size() - m_at);
    std::copy_n(m_data.data() + m_at, n, out);
    m_at += n;
    return n;
}

std::unique_ptr<Storage::Reader> Storage::open_reader(const std::string& name) const {
    auto all = read(name);
    if (!all) return nullptr;
    return std::make_unique<MemoryReader>(std::move(*all));
}

void fsync_directory(const std::string& dir) { io::fsync_dir(dir); }

fs::path store_directory(const std::string& path) {
    fs::path p = fs::absolute(path);
    while (!p.has_filename() || p.filename() == ".") {
        if (p == p.parent_path()) break;
        p = p.parent_path();
    }
    if (p.filename() == "..")
        throw UsageError("the key store path " + path + " ends in '..'", "name the store's directory itself");
    return p;
}

void create_private_directories(const std::string& path) {
    fs::path at;
    for (const auto& part : fs::absolute(path).lexically_normal()) {
        if (part.empty()) continue;  // the end of a path with a trailing slash
        at /= part;
        if (at == at.root_path()) continue;
        if (::mkdir(at.c_str(), 0700) != 0 && errno != EEXIST) return;
    }
}

std::unique_ptr<Storage> open_file_storage(const std::string& root) {
    return std::make_unique<FileStorage>(root);
}

}  // namespace keywarden::keystore
