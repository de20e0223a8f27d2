// SPDX-License-Identifier: Apache-2.0
// Records of the master keys an init is about to generate, so that the keys of a run killed
// before its store.json names them can still be found and destroyed (docs/operations.md 5.5).
#pragma once

#include <string>

#include "keywarden/keystore.hpp"
#include "keywarden/open_store.hpp"
#include "keywarden/token_context.hpp"

namespace keywarden::keystore {

// ".<store name>.<kind>-keys-XXXXXX" beside the store at store_path; kind is "import" (import
// --init) or "init". The run that writes it holds an flock on it until it ends, so that another
// run can tell a live record from one a killed run left.
class PlannedKeysRecord {
public:
    PlannedKeysRecord(const std::string& store_path, const std::string& kind);
    ~PlannedKeysRecord();
    PlannedKeysRecord(const PlannedKeysRecord&) = delete;
    PlannedKeysRecord& operator=(const PlannedKeysRecord&) = delete;
    // Written (0600, O_EXCL), locked and synced, with its directory, before the first key is
    // generated (InitParams::before_generating). Nothing stays if it throws.
    void write(const StoreMeta& planned);
    // store.json names the keys now: the record goes. A record written and never stored (init
    // failed; it destroys the keys it made, but may have failed to) stays for the next run.
    void stored();
    // Sets p's before_generating to write() and before_completing to stored(), for this record.
    void attach(InitParams& p);

private:
    std::string m_path, m_temp;
    int m_fd = -1;
};

// The JSON of a record, and back (nullopt when it is not one this version reads).
std::string planned_keys_text(const StoreMeta& planned);
std::optional<StoreMeta> parse_planned_keys(const std::string& text);

// Destroys the generated master keys that `meta` names (a store that never came to be), on ctx's
// token only, when label and CKA_ID are the generated ones; keys on another token are named in a
// warning. `who` says what made them ("an import --init", "an init"). True when none of them can
// be left on any token as far as this run can tell.
bool forget_generated_keys(const StoreMeta& meta, pkcs11::TokenContext& ctx, const std::string& who);

// Acts on the records of `kind` beside the store at store_path that killed runs left: only on a
// regular 0600 file of this user (anything else: Error, changing nothing) that no live run holds.
// Destroys the keys each names (forget_generated_keys) and removes it when they are gone.
void forget_planned_keys(const std::string& store_path, const std::string& kind, pkcs11::TokenContext& ctx);

}  // namespace keywarden::keystore
