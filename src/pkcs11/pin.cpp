// SPDX-License-Identifier: Apache-2.0
#include "keywarden/pin.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "keywarden/error.hpp"
#include "keywarden/log.hpp"

namespace keywarden {

std::string PinSource::describe() const {
    switch (kind) {
        case Kind::env: return "env:" + arg;
        case Kind::file: return "file:" + arg;
        case Kind::prompt: return "prompt";
    }
    return "?";
}

PinSource parse_pin_source(std::string_view spec) {
    // The spec itself is never echoed: an operator who typed a PIN here must not see it in
    // logs or terminal scrollback.
    auto refuse = [](const std::string& why) {
        return UsageError("bad PIN source: " + why,
                          "use env:VAR, file:PATH or prompt; a PIN is never accepted as a "
                          "command-line value");
    };
    if (spec == "prompt") return {PinSource::Kind::prompt, {}};
    if (spec.starts_with("env:")) {
        std::string var(spec.substr(4));
        if (var.empty()) throw refuse("no variable name after env:");
        return {PinSource::Kind::env, var};
    }
    if (spec.starts_with("file:")) {
        std::string path(spec.substr(5));
        // RFC 7512 pin-source may be a file: URI: file:///path or file:/path.
        if (path.starts_with("///")) path = path.substr(2);
        if (path.empty()) throw refuse("no path after file:");
        return {PinSource::Kind::file, path};
    }
    if (spec.starts_with("/")) return {PinSource::Kind::file, std::string(spec)};
    throw refuse("not env:VAR, file:PATH or prompt");
}

std::optional<PinSource> default_pin_source() {
    if (std::getenv("KEYWARDEN_PIN") != nullptr) return PinSource{PinSource::Kind::env, "KEYWARDEN_PIN"};
    if (isatty(STDIN_FILENO)) return PinSource{PinSource::Kind::prompt, {}};
    return std::nullopt;
}

namespace {

SecureBytes first_line(const SecureBytes& all) {
    std::size_t n = 0;
    while (n < all.size() && all[n] != '\n' && all[n] != '\r') ++n;
    return SecureBytes(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n));
}

SecureBytes read_file_pin(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        throw TokenError("cannot open PIN file " + path + ": " + std::strerror(errno),
                         "check the path given with file:");
    struct stat st {};
    if (fstat(fd, &st) == 0 && (st.st_mode & 077) != 0)
        log::warn("PIN file " + path + " is readable by group or others; run: chmod 600 " + path);
    SecureBytes all(4096);
    std::size_t got = 0;
    while (got < all.size()) {
        ssize_t r = ::read(fd, all.data() + got, all.size() - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += static_cast<std::size_t>(r);
    }
    ::close(fd);
    all.resize(got);
    SecureBytes pin = first_line(all);
    if (pin.empty()) throw TokenError("PIN file " + path + " is empty", "write the PIN into it");
    return pin;
}

SecureBytes prompt_pin(std::string_view prompt) {
    int fd = ::open("/dev/tty", O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        throw TokenError("a PIN is needed but there is no terminal to ask on",
                         "set KEYWARDEN_PIN, or pass --pin-source env:VAR or file:PATH");
    struct termios old {};
    bool restore = tcgetattr(fd, &old) == 0;
    if (restore) {
        struct termios quiet = old;
        quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
        quiet.c_lflag |= ECHONL;
        tcsetattr(fd, TCSAFLUSH, &quiet);
    }
    (void)!::write(fd, prompt.data(), prompt.size());
    SecureBytes buf(256);
    std::size_t got = 0;
    while (got < buf.size()) {
        char c = 0;
        ssize_t r = ::read(fd, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || c == '\n') break;
        buf[got++] = static_cast<std::uint8_t>(c);
        wipe(&c, 1);
    }
    if (restore) tcsetattr(fd, TCSAFLUSH, &old);
    ::close(fd);
    buf.resize(got);
    if (buf.empty()) throw TokenError("no PIN entered", "");
    return buf;
}

}  // namespace

SecureBytes read_pin(const PinSource& src, std::string_view prompt) {
    switch (src.kind) {
        case PinSource::Kind::env: {
            const char* v = std::getenv(src.arg.c_str());
            if (v == nullptr || *v == '\0')
                throw TokenError("PIN variable " + src.arg + " is not set or empty",
                                 "export " + src.arg + " before running keywarden");
            return SecureBytes(reinterpret_cast<const std::uint8_t*>(v),
                               reinterpret_cast<const std::uint8_t*>(v) + std::strlen(v));
        }
        case PinSource::Kind::file: return read_file_pin(src.arg);
        case PinSource::Kind::prompt: return prompt_pin(prompt);
    }
    throw Error("unknown PIN source");
}

}  // namespace keywarden
