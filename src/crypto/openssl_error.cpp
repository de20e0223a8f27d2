// SPDX-License-Identifier: Apache-2.0
#include <openssl/err.h>

#include "keywarden/error.hpp"

namespace keywarden {

namespace {
std::string drain_queue(const std::string& function) {
    std::string msg = function + " failed";
    bool first = true;
    unsigned long code = 0;
    const char* file = nullptr;
    int line = 0;
    while ((code = ERR_get_error_all(&file, &line, nullptr, nullptr, nullptr)) != 0) {
        char buf[256];
        ERR_error_string_n(code, buf, sizeof buf);
        msg += first ? ": " : "; ";
        msg += buf;
        first = false;
    }
    return msg;
}
}  // namespace

OpenSslError::OpenSslError(const std::string& function) : Error(drain_queue(function)) {}

}  // namespace keywarden
