// SPDX-License-Identifier: Apache-2.0
// Plain option structs bound to CLI11 (by main.cpp). Parsing has no side effects.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "keywarden/token_context.hpp"

// CLI11 is included by main.cpp alone: the other command files need only the option structs.
namespace CLI {
class App;
}

namespace keywarden::cli {

struct GlobalOptions {
    // --module / KEYWARDEN_MODULE, --module-init-args, --token / KEYWARDEN_TOKEN,
    // --pin-source / KEYWARDEN_PIN_SOURCE
    pkcs11::TokenOptions tok;
    std::string keystore;                        // --keystore / KEYWARDEN_KEYSTORE
    bool json = false;
    int verbose = 0;
};

struct InitOptions {
    std::string master_encryption_key, master_signature_key;  // pkcs11: URIs
    bool allow_extractable_master = false;
    int store_version = 2;
};

struct GenerateOptions {
    std::vector<std::string> client_ids;
    std::string client_ids_from;
    bool storage_keypair = false, symmetric = false, hmac = false;
    bool poison_record_keys = false, audit_log_key = false;
};

struct ListOptions {
    bool rotated = false;
};

struct ReadOptions {
    std::string key_id;
    bool public_half = false, private_half = false;
    std::optional<std::uint32_t> version;
    std::string format = "base64";
};

struct DestroyOptions {
    std::string key_id;
    std::optional<std::uint32_t> version;
    bool all_versions = false;
};

struct RotateOptions {
    std::vector<std::string> key_ids;
};

struct ExportOptions {
    std::string bundle, secret;
    bool all = false, private_keys = false;
    std::size_t jobs = 1;
    std::vector<std::string> key_ids;
};

struct ImportOptions {
    std::string bundle, secret;
    bool init = false, merge = false, dry_run = false;
    std::size_t jobs = 1;
    std::string on_conflict = "abort";
    InitOptions init_options;
};

struct VerifyBundleOptions {
    std::string bundle, secret;
    bool against_store = false;
    std::size_t jobs = 1;
};

struct BackupV1Options {
    std::string action;  // export | import
    std::string file;
    std::string key_out;  // --backup-key-out FD|PATH
    bool init = false, merge = false, dry_run = false;
    std::string keys_private_dir, keys_public_dir;  // Acra's spellings of the store directory
    InitOptions init_options;
};

struct MigrateOptions {
    std::string src, dst;
    std::string dst_token, dst_module, dst_pin_source;
    bool dry_run = false, force = false;
};

struct Options {
    GlobalOptions g;
    BackupV1Options backup;
    MigrateOptions migrate;
    InitOptions init;
    GenerateOptions generate;
    ListOptions list;
    ReadOptions read;
    DestroyOptions destroy;
    RotateOptions rotate;
    ExportOptions exp;
    ImportOptions imp;
    VerifyBundleOptions verify;
};

struct Commands {
    CLI::App* token = nullptr;
    CLI::App* token_list = nullptr;
    CLI::App* token_check = nullptr;
    CLI::App* init = nullptr;
    CLI::App* generate = nullptr;
    CLI::App* list = nullptr;
    CLI::App* read = nullptr;
    CLI::App* destroy = nullptr;
    CLI::App* rotate = nullptr;
    CLI::App* keystore = nullptr;
    CLI::App* keystore_verify = nullptr;
    CLI::App* exp = nullptr;
    CLI::App* imp = nullptr;
    CLI::App* verify = nullptr;
    CLI::App* backup = nullptr;
    CLI::App* migrate = nullptr;
};

// Builds the whole command tree on `app`, binding into `o`. No side effects.
Commands build_cli(CLI::App& app, Options& o);

using pkcs11::TokenContext;

int run_token_list(const GlobalOptions& g);
int run_token_check(const GlobalOptions& g);

// A progress bar on stderr, only when stderr is a terminal; empty otherwise.
std::function<void(std::size_t done, std::size_t total)> progress_bar(const char* what);

// How an import's dry run starts its summary: "dry run: the bundle verifies (N keys unwrapped
// and checked in the token)", with `what` "bundle" or "backup".
std::string dry_run_verified(const char* what, std::size_t unwrapped);

// The store location: --keystore, KEYWARDEN_KEYSTORE, the config file, else the default.
std::string keystore_path(const GlobalOptions& g);
extern const char* const kDefaultKeystore;

int run_init(const GlobalOptions& g, const InitOptions& o);
int run_generate(const GlobalOptions& g, const GenerateOptions& o);
int run_rotate(const GlobalOptions& g, const RotateOptions& o);
int run_list(const GlobalOptions& g, const ListOptions& o);
int run_read(const GlobalOptions& g, const ReadOptions& o);
int run_destroy(const GlobalOptions& g, const DestroyOptions& o);
int run_keystore_verify(const GlobalOptions& g);
int run_export(const GlobalOptions& g, const ExportOptions& o);
int run_import(const GlobalOptions& g, const ImportOptions& o);
int run_verify_bundle(const GlobalOptions& g, const VerifyBundleOptions& o);
int run_backup_v1(const GlobalOptions& g, const BackupV1Options& o);
int run_migrate(const GlobalOptions& g, const MigrateOptions& o);

}  // namespace keywarden::cli
