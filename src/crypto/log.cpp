// SPDX-License-Identifier: Apache-2.0
#include "keywarden/log.hpp"

#include <atomic>
#include <cstdio>
#include <string>

namespace keywarden::log {

namespace {
std::atomic<int> g_level{0};
void emit(const char* prefix, std::string_view msg) {
    std::string line = std::string(prefix) + std::string(msg) + "\n";
    std::fwrite(line.data(), 1, line.size(), stderr);
}
}  // namespace

void set_verbosity(int level) noexcept { g_level = level; }
int verbosity() noexcept { return g_level; }
void warn(std::string_view msg) { emit("warning: ", msg); }
void info(std::string_view msg) {
    if (g_level >= 1) emit("", msg);
}
void debug(std::string_view msg) {
    if (g_level >= 2) emit("debug: ", msg);
}

}  // namespace keywarden::log
