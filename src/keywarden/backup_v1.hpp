// SPDX-License-Identifier: Apache-2.0
// The key store v1 backup (Acra's `acra-backup --action=export|import`): one file, opened by one
// backup key that is shown once. The file is a key bundle (docs/bundle-format.md) whose first
// line is "keywarden-v1-backup 1" and whose two backup keys are derived from the backup key.
#pragma once

#include <string>
#include <vector>

#include "keywarden/backup.hpp"
#include "keywarden/open_store.hpp"

namespace keywarden::backup {

struct V1ExportOptions {
    std::string file;
    // Where the backup key is shown, and nowhere else (never in a log): key_fd if it is set (an
    // open descriptor that this call closes; the caller duplicates the operator's descriptor
    // before it opens any file of its own); else key_out, a new file (O_EXCL, 0600); else the
    // terminal (/dev/tty).
    int key_fd = -1;
    std::string key_fd_name;  // how messages name it ("file descriptor 3")
    std::string key_out;
    Progress progress;
};

struct V1ExportSummary {
    std::string bundle_id;
    std::size_t rings = 0, entries = 0, wrapped_keys = 0;
    std::uint64_t bytes = 0;
    double seconds = 0;
    std::string key_shown_on;  // "/dev/tty", "file descriptor 3", a path
};

// Generates a fresh backup key in the store's token, wraps every key of the v1 store under a key
// derived from it inside the token, writes the file (0600, O_EXCL), verifies it back, and only
// then shows the backup key once. Refuses an existing file, and the lack of a terminal without
// key_out, before anything is written. A failure leaves no file behind.
V1ExportSummary export_v1_backup(keystore::OpenAnyStore& store, const V1ExportOptions& o);

struct V1ImportOptions {
    std::string file;
    std::string keystore_path;
    bool init = false;  // create the v1 store and its master key
    keystore::InitParams init_params;
    bool merge = false;  // allow a store that already holds other keys (never overwrites)
    bool dry_run = false;
    Progress progress;
};

struct V1ImportSummary {
    std::string bundle_id;
    std::size_t rings = 0, entries = 0;
    std::vector<std::string> key_ids;    // what the file holds
    std::vector<std::string> conflicts;  // key ids already in the target store
    std::string refused;                 // dry run: why the import would refuse
    std::size_t unwrapped_in_token = 0;  // dry run: keys unwrapped and checked in the token
    bool dry_run = false;
    double seconds = 0;
};

// Verifies the whole file under the backup key first, then builds the result in a staging
// directory beside the store and switches it in with one atomic rename. Keys are unwrapped in
// the destination token and wrapped again under its master key there. Any key id that already
// exists in the target is refused: a v1 import never overwrites.
V1ImportSummary import_v1_backup(const pkcs11::TokenOptions& token, const SecureBytes& backup_key,
                                 const V1ImportOptions& o);

// The backup key from BACKUP_MASTER_KEY (base64 of 32 bytes). Throws UsageError when it is unset,
// not base64, or of another length. The variable is wiped from this process's environment.
SecureBytes backup_key_from_env();

}  // namespace keywarden::backup
