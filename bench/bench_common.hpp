// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the benchmark programs in bench/.
#pragma once

#include <chrono>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kwbench {

using Clock = std::chrono::steady_clock;

// Used when hsm-config/softhsm2.conf.in cannot be found (same content).
inline constexpr const char* kFallbackConf =
    "directories.tokendir = @TOKENDIR@\n"
    "objectstore.backend = file\n"
    "log.level = ERROR\n"
    "slots.removable = false\n";

inline double seconds_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}

inline std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v && *v ? v : fallback;
}

inline std::string make_temp_dir(const std::string& prefix) {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!mkdtemp(tmpl.data()))
        throw std::runtime_error("mkdtemp failed: " + std::string(std::strerror(errno)));
    return tmpl;
}

inline std::string read_text(const std::string& path) {
    std::ifstream in(path);
    if (!in) return {};
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

}  // namespace kwbench
