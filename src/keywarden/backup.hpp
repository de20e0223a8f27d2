// SPDX-License-Identifier: Apache-2.0
// Backups of key store v2: export under fresh token backup keys, import into a fresh store,
// verify without restoring. Format: docs/bundle-format.md.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "keywarden/bundle.hpp"
#include "keywarden/keystore.hpp"
#include "keywarden/open_store.hpp"

namespace keywarden::backup {

using Progress = std::function<void(std::size_t done, std::size_t total)>;

struct ExportOptions {
    std::string bundle_path, secret_path;
    bool all = false;
    std::vector<keystore::KeyId> ids;  // when not all
    bool private_keys = false;
    std::size_t jobs = 1;  // worker processes, each with its own session
    Progress progress;
};

struct ExportSummary {
    std::string bundle_id;
    std::size_t rings = 0, entries = 0, wrapped_keys = 0;
    std::uint64_t bytes = 0;
    double seconds = 0;
};

// Generates a backup encryption key (AES-256) and a backup signature key (HMAC) in the store's
// token as session objects, wraps every selected key under the first inside the token, writes
// the bundle and the secret file (0600, O_EXCL), and verifies the bundle back before it returns.
// Refuses existing paths and bundle == secret; a failure leaves no file behind.
ExportSummary export_bundle(keystore::OpenStore& store, const ExportOptions& o);

struct BundleProblem {
    std::string key_id;  // or "bundle"
    std::string problem;
};

struct BundleEntrySummary {
    std::string key_id;
    std::uint32_t version;
    keystore::KeyState state;
    bool wrapped;
    Bytes kcv;
};

struct VerifyReport {
    BundleHeader header;
    std::size_t entries = 0, unwrapped = 0;
    std::vector<BundleProblem> problems;  // integrity, unwrap and comparison problems
    // With a store: keys missing from the bundle, extra in it, or different (by check value).
    std::vector<std::string> missing, extra, different;
    std::size_t not_covered = 0;  // live store keys in rings the bundle does not hold at all
    // With a store: whether the comparison covers the whole bundle (pass 1 read all of it). When
    // not, the three lists above are empty: a partial comparison would mislead.
    bool compared = false;
    bool ok() const { return problems.empty() && different.empty(); }
};

// Checks the secret against the header, the whole-file MAC, the counts and every entry's
// metadata; unwraps every wrapped key in `token` (session objects, destroyed) and checks its key
// check value there. With `against`, compares the bundle with the live store by check value.
VerifyReport verify_bundle(const std::string& bundle_path, const std::string& secret_path,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress = {}, std::size_t jobs = 1);
// The same with the backup keys already in hand (a v1 backup's, derived from its backup key).
VerifyReport verify_bundle(const std::string& bundle_path, const SecretFile& secret,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress = {}, std::size_t jobs = 1);

enum class OnConflict { abort, skip, overwrite };

struct ImportOptions {
    std::string bundle_path, secret_path;
    std::string keystore_path;
    bool init = false;  // create the store and its master keys
    keystore::InitParams init_params;
    bool merge = false;
    OnConflict on_conflict = OnConflict::abort;
    bool dry_run = false;
    std::size_t jobs = 1;
    Progress progress;
};

struct ImportSummary {
    std::string bundle_id;
    std::size_t rings = 0, entries = 0, wrapped_keys = 0;
    std::vector<std::string> imported, conflicts, skipped;  // key ids (imported: dry runs only)
    // --on-conflict overwrite: per overwritten ring, the versions only the store holds (made after
    // the export), which the import keeps instead of dropping (the store's current one stays
    // current).
    std::map<std::string, std::vector<std::uint32_t>> kept;
    std::size_t kept_count() const {
        std::size_t n = 0;
        for (const auto& [id, versions] : kept) n += versions.size();
        return n;
    }
    // --on-conflict overwrite: store versions ("key@version") that the bundle holds with another
    // key (check values differ), or without the key the store has; and store rings that cannot be
    // read ("key", damaged). The import is refused: overwrite never loses a key.
    std::vector<std::string> replaced;
    std::size_t rings_written = 0, entries_written = 0;
    std::string refused;  // dry run: why the real import would refuse, if it would
    std::size_t unwrapped_in_token = 0;  // dry run: keys unwrapped and checked in the token
    std::string refused_hint;
    bool dry_run = false;
    double seconds = 0;
};

// Verifies the whole bundle first, then builds the result in a staging directory beside the
// store, then switches it in with one atomic rename (RENAME_EXCHANGE). A failure or a kill at
// any point leaves the target exactly as it was. Keys are unwrapped under the backup key in the
// destination token and wrapped again under its master key there.
ImportSummary import_bundle(const pkcs11::TokenOptions& token, const ImportOptions& o);

}  // namespace keywarden::backup
