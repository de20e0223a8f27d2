// SPDX-License-Identifier: Apache-2.0
// Messages for people, on stderr. Never key bytes, PINs, wrapped blobs or secret-file contents.
#pragma once

#include <string_view>

namespace keywarden::log {

// 0 = warnings only, 1 = -v (info), 2 = -vv (also every PKCS#11 call and its return code).
void set_verbosity(int level) noexcept;
int verbosity() noexcept;

void warn(std::string_view msg);
void info(std::string_view msg);   // shown at -v
void debug(std::string_view msg);  // shown at -vv

}  // namespace keywarden::log
