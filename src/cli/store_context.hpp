// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "keywarden/keystore.hpp"
#include "options.hpp"

namespace keywarden::cli {

// An open store with its token: what store commands need (mu's with_store).
struct OpenStore {
    TokenContext token;
    keystore::StoreMeta meta;
    std::unique_ptr<keystore::KeyStore> store;
};

// Reads store.json, selects the store's token (by its recorded serial unless --token says
// otherwise), logs in, finds the master keys and opens the store.
OpenStore with_store(const GlobalOptions& g, bool writable, bool strict = true);

}  // namespace keywarden::cli
