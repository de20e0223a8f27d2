// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "keywarden/open_store.hpp"
#include "options.hpp"

namespace keywarden::cli {

using keystore::OpenStore;

// What store commands need (mu's with_store): the store named by the options, opened.
OpenStore with_store(const GlobalOptions& g, bool writable, bool strict = true);
// Read-only, for one streamed pass over every ring (export --all): see open_store_streaming.
OpenStore with_store_streaming(const GlobalOptions& g);
// The same for commands that work on either store version.
keystore::OpenAnyStore with_any_store(const GlobalOptions& g, bool writable, bool strict = true);

}  // namespace keywarden::cli
