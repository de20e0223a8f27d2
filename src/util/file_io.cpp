// SPDX-License-Identifier: Apache-2.0
#include "util/file_io.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "keywarden/error.hpp"

namespace keywarden::io {

void Fd::reset(int fd) noexcept {
    if (m_fd >= 0) ::close(m_fd);
    m_fd = fd;
}

int Fd::close() noexcept {
    if (m_fd < 0) return 0;
    return ::close(release());
}

void fail(const std::string& what, const std::string& path) {
    int e = errno;
    std::string hint;
    if (e == ENOSPC || e == EDQUOT || e == EFBIG)
        hint = "the disk (or a file size limit) is full: free space and run the command again; "
               "nothing was replaced";
    else if (e == EACCES || e == EPERM)
        hint = "check the owner and permissions of " + path + " and of its directory";
    throw Error(what + " " + path + ": " + std::strerror(e), hint);
}

bool write_fully(int fd, std::string_view data) noexcept {
    for (std::size_t off = 0; off < data.size();) {
        ssize_t n = ::write(fd, data.data() + off, data.size() - off);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) errno = EIO;
        if (n <= 0) return false;
        off += static_cast<std::size_t>(n);
    }
    return true;
}

void write_all(int fd, std::string_view data, const std::string& path) {
    if (!write_fully(fd, data)) fail("cannot write", path);
}

void write_all(int fd, std::span<const std::uint8_t> data, const std::string& path) {
    write_all(fd, std::string_view(reinterpret_cast<const char*>(data.data()), data.size()), path);
}

std::string read_to_end(int fd) {
    std::string out;
    char buf[4096];
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

void fsync_dir(const std::string& dir) {
    Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid() || ::fsync(fd.get()) != 0) fail("cannot sync directory", dir);
}

void fsync_dir_of(const std::string& path) {
    fsync_dir(std::filesystem::absolute(path).parent_path().string());
}

}  // namespace keywarden::io
