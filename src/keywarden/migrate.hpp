// SPDX-License-Identifier: Apache-2.0
// keywarden migrate: every key of a v1 store into a v2 store, rotated history included.
#pragma once

#include <string>
#include <vector>

#include "keywarden/backup.hpp"
#include "keywarden/token_context.hpp"

namespace keywarden::backup {

struct MigrateOptions {
    std::string src_path, dst_path;
    // The source store's token (empty token: the one its store.json names), and the
    // destination's (empty fields: the source's module and PIN source, the token its store.json
    // names).
    pkcs11::TokenOptions src_token, dst_token;
    bool dry_run = false;
    bool force = false;  // allow a destination that holds keys from elsewhere
    Progress progress;
};

struct MigrateSummary {
    std::vector<std::string> to_move;          // key ids moved (or, dry run, that would move)
    std::vector<std::string> already_present;  // identical rings in the destination: skipped
    std::vector<std::string> others;           // destination rings not in the source
    std::size_t versions = 0;                  // key versions moved
    bool same_token = false;
    bool dry_run = false;
    double seconds = 0;
};

// Reads every ring of the v1 store (each rotated version becomes an older version, in the order
// the v1 store numbered them), rewraps each key inside the token(s), and writes the rings into
// the v2 store with one manifest commit: all or nothing. Rings already in the destination with
// the same versions and key check values are skipped (a second run changes nothing); a ring
// there with the same id but other keys is refused; a destination holding other rings needs
// force. Across two tokens, keys travel wrapped under a one-time transport key.
MigrateSummary migrate_v1_to_v2(const MigrateOptions& o);

}  // namespace keywarden::backup
