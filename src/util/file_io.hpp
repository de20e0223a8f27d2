// SPDX-License-Identifier: Apache-2.0
// The one set of file-I/O helpers of the library: an owning descriptor, full writes, directory
// syncs, and the error an operator reads when one of them fails. Private to the library.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace keywarden::io {

// An owned file descriptor: closed by the destructor (errors ignored there: call close() where
// the result matters, e.g. after writing). Movable, not copyable; never throws.
class Fd {
public:
    Fd() noexcept = default;
    explicit Fd(int fd) noexcept : m_fd(fd) {}
    ~Fd() { reset(); }
    Fd(Fd&& o) noexcept : m_fd(o.release()) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) reset(o.release());
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;

    int get() const noexcept { return m_fd; }
    bool valid() const noexcept { return m_fd >= 0; }
    int release() noexcept {
        int f = m_fd;
        m_fd = -1;
        return f;
    }
    // Closes the current descriptor (if any) and owns `fd`.
    void reset(int fd = -1) noexcept;
    // Closes now and reports ::close's result (0, or -1 with errno set). Idempotent.
    int close() noexcept;

private:
    int m_fd = -1;
};

// Throws Error("WHAT PATH: strerror(errno)") with the hint an operator needs: a full disk or a
// file size limit (ENOSPC, EDQUOT, EFBIG: free space and run again; nothing was replaced), or
// permissions (EACCES, EPERM). Reads errno first.
[[noreturn]] void fail(const std::string& what, const std::string& path);

// Writes all of `data`, retrying EINTR; a write that makes no progress fails with EIO. Throws
// through fail("cannot write", path).
void write_all(int fd, std::span<const std::uint8_t> data, const std::string& path);
void write_all(int fd, std::string_view data, const std::string& path);
// The same without throwing, for a forked child or a destructor: false on any failure.
bool write_fully(int fd, std::string_view data) noexcept;
// Everything until end of file (or an error), for pipes between processes.
std::string read_to_end(int fd);

// fsync of a directory, so that a rename or link in it is durable. Throws through fail().
void fsync_dir(const std::string& dir);
// fsync of the directory that holds `path` (made absolute first).
void fsync_dir_of(const std::string& path);

}  // namespace keywarden::io
