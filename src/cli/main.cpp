// SPDX-License-Identifier: Apache-2.0
// The CLI boundary: parse, dispatch, and map every error to a documented exit code.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <CLI/CLI.hpp>
#include <iostream>

#include "keywarden/log.hpp"
#include "version.hpp"
#include "options.hpp"

namespace keywarden::cli {

std::string dry_run_verified(const char* what, std::size_t unwrapped) {
    return std::string("dry run: the ") + what + " verifies (" + std::to_string(unwrapped) +
           " keys unwrapped and checked in the token)";
}

std::function<void(std::size_t, std::size_t)> progress_bar(const char* what) {
    if (!isatty(STDERR_FILENO)) return {};
    return [what](std::size_t done, std::size_t total) {
        if (done != total && done % 100 != 0) return;
        int width = 30;
        int filled = total ? static_cast<int>(width * done / total) : width;
        std::cerr << "\r" << what << " [" << std::string(filled, '#') << std::string(width - filled, ' ')
                  << "] " << done << "/" << total << (done == total ? "\n" : "") << std::flush;
    };
}

namespace {
constexpr const char* kExitCodes =
    "Exit codes: 0 ok, 1 failure, 2 usage error, 3 token or PIN problem, 4 integrity failure.";
}

// Over 80 lines on purpose: the whole command tree as one declarative table (every command,
// option and check in the order --help shows them); split, it would be read in pieces.
Commands build_cli(CLI::App& app, Options& o) {
    GlobalOptions& g = o.g;
    app.footer(kExitCodes);
    app.set_version_flag("--version", std::string("keywarden ") + KEYWARDEN_VERSION);
    app.set_config("--config", "", "Read options from a CLI11 (TOML/INI) config file");
    app.require_subcommand(1);
    // Global options may follow the subcommand: `keywarden token list --json`.
    app.fallthrough();

    app.add_option("--module", g.tok.module,
                   "PKCS#11 module: a file path, or the name p11-kit registers it under")
        ->envname("KEYWARDEN_MODULE");
    app.add_option("--module-init-args", g.tok.module_init_args,
                   "String passed as CK_C_INITIALIZE_ARGS.pReserved (p11-kit x-init-reserved)");
    app.add_option("--token", g.tok.token,
                   "Token: a pkcs11: URI (RFC 7512), label:NAME, serial:NUMBER, or a bare label "
                   "or serial")
        ->envname("KEYWARDEN_TOKEN");
    app.add_option("--pin-source", g.tok.pin_source,
                   "Where the PIN comes from: env:VAR, file:PATH or prompt (default: "
                   "$KEYWARDEN_PIN, then a prompt on a terminal). Never the PIN itself.")
        ->envname("KEYWARDEN_PIN_SOURCE");
    app.add_option("--keystore,--keys_dir", g.keystore,
                   std::string("Key store directory (default: ") + kDefaultKeystore + ")")
        ->envname("KEYWARDEN_KEYSTORE");
    app.add_flag("--json", g.json, "Machine-readable output on stdout");
    app.add_flag("-v,--verbose", g.verbose, "More messages on stderr (-vv: every PKCS#11 call)");

    Commands c;
    c.token = app.add_subcommand("token", "Inspect PKCS#11 tokens");
    c.token->require_subcommand(1);
    c.token->footer(kExitCodes);
    c.token_list = c.token->add_subcommand(
        "list", "Show every slot and token: label, serial, manufacturer, model, flags, sessions");
    c.token_list->footer(kExitCodes);
    c.token_check = c.token->add_subcommand(
        "check", "Try each key-protection method on the chosen token and say which would be used");
    c.token_check->footer(kExitCodes);

    c.init = app.add_subcommand("init", "Create an empty key store and its master keys in the token");
    c.init->add_option("--master-encryption-key,--master_encryption_key",
                       o.init.master_encryption_key,
                       "Use this existing AES-256 token key (pkcs11: URI) instead of generating one");
    c.init->add_option("--master-signature-key,--master_signature_key", o.init.master_signature_key,
                       "Use this existing HMAC token key (pkcs11: URI) instead of generating one");
    c.init->add_flag("--allow-extractable-master", o.init.allow_extractable_master,
                     "Accept master keys with CKA_EXTRACTABLE=true (warns)");
    c.init->add_option("--store-version", o.init.store_version,
                       "Key store format: 2 (default; two master keys, signed manifest) or 1 (Acra's "
                       "v1 layout, one master key)")
        ->check(CLI::IsMember({1, 2}));

    c.generate = app.add_subcommand("generate", "Generate keys (a new current version if the key exists)");
    c.generate->add_option("--client-id,--client_id", o.generate.client_ids,
                           "Client id (5-256 characters from A-Z a-z 0-9 _ - and space); repeatable");
    c.generate->add_option("--client-ids-from", o.generate.client_ids_from,
                           "File with one client id per line: all generated in one update");
    c.generate->add_flag("--storage-keypair,--client_storage_keypair", o.generate.storage_keypair,
                         "The client's EC P-256 storage keypair");
    c.generate->add_flag("--symmetric,--client_storage_symmetric_key", o.generate.symmetric,
                         "The client's AES-256 storage key");
    c.generate->add_flag("--hmac,--search_hmac_symmetric_key", o.generate.hmac,
                         "The client's HMAC key for searchable encryption");
    c.generate->add_flag("--poison-record-keys,--poison_record_keys", o.generate.poison_record_keys,
                         "The poison-record keypair and symmetric key");
    c.generate->add_flag("--audit-log-key,--audit_log_symmetric_key", o.generate.audit_log_key,
                         "The audit-log key");

    c.rotate = app.add_subcommand("rotate", "Add a new current version to existing keys");
    c.rotate->add_option("key-id", o.rotate.key_ids, "Key ids (see 'keywarden list')")->required();

    c.list = app.add_subcommand("list", "List key ids, kinds, versions, states and dates (never key material)");
    c.list->add_flag("--rotated", o.list.rotated, "Show every version, not only the current one");

    c.read = app.add_subcommand("read", "Write a key's material to stdout for an application");
    c.read->add_option("key-id", o.read.key_id, "Key id (see 'keywarden list')")->required();
    c.read->add_flag("--public", o.read.public_half, "The public half of a keypair");
    c.read->add_flag("--private", o.read.private_half,
                     "Private or symmetric material (required for it)");
    c.read->add_option("--version", o.read.version, "Version number (default: the current one)");
    c.read->add_option("--format", o.read.format, "raw, base64 or pem")
        ->check(CLI::IsMember({"raw", "base64", "pem"}));

    c.destroy = app.add_subcommand("destroy", "Wipe a key version's material and mark it destroyed");
    c.destroy->add_option("key-id", o.destroy.key_id, "Key id")->required();
    c.destroy->add_option("--version", o.destroy.version, "The version to destroy");
    c.destroy->add_flag("--all-versions", o.destroy.all_versions, "Destroy every version");

    c.keystore = app.add_subcommand("keystore", "Key store maintenance");
    c.keystore->require_subcommand(1);
    c.keystore_verify = c.keystore->add_subcommand(
        "verify", "Check every MAC, the manifest, and that every live key unwraps in the token");

    auto bundle_paths = [](CLI::App* sub, std::string& bundle, std::string& secret) {
        sub->add_option("--key-bundle-file,--key_bundle_file", bundle, "The key bundle file")->required();
        sub->add_option("--key-bundle-secret,--key_bundle_secret", secret,
                        "The secret file with the backup keys (keep it apart from the bundle)")
            ->required();
    };
    c.exp = app.add_subcommand("export", "Back up keys into a bundle under fresh backup keys made in the token");
    bundle_paths(c.exp, o.exp.bundle, o.exp.secret);
    c.exp->add_flag("--all", o.exp.all, "Every key ring");
    c.exp->add_flag("--private-keys,--private_keys", o.exp.private_keys,
                    "Include private and symmetric keys (without it: public halves only, as Acra)");
    c.exp->add_option("key-id", o.exp.key_ids, "Key ids to export (instead of --all)");
    const char* jobs_help = "Spread the token work over N processes, each with its own session";
    c.exp->add_option("--jobs,-j", o.exp.jobs, jobs_help)->check(CLI::Range(1, 64));

    c.imp = app.add_subcommand("import", "Restore a bundle into an empty store, all or nothing");
    bundle_paths(c.imp, o.imp.bundle, o.imp.secret);
    c.imp->add_flag("--init", o.imp.init, "Create the store and its master keys first");
    c.imp->add_flag("--merge", o.imp.merge, "Import into a store that already holds keys");
    c.imp->add_option("--on-conflict", o.imp.on_conflict, "With --merge: abort, skip or overwrite")
        ->check(CLI::IsMember({"abort", "skip", "overwrite"}));
    c.imp->add_flag("--dry-run", o.imp.dry_run, "Verify and list what would be imported; write nothing");
    c.imp->add_option("--jobs,-j", o.imp.jobs, jobs_help)->check(CLI::Range(1, 64));
    c.imp->add_option("--master-encryption-key", o.imp.init_options.master_encryption_key,
                      "With --init: use this existing token key (pkcs11: URI)");
    c.imp->add_option("--master-signature-key", o.imp.init_options.master_signature_key,
                      "With --init: use this existing token key (pkcs11: URI)");
    c.imp->add_flag("--allow-extractable-master", o.imp.init_options.allow_extractable_master,
                    "With --init: accept extractable master keys");

    c.verify = app.add_subcommand("verify", "Check a bundle without restoring it (a restore drill)");
    bundle_paths(c.verify, o.verify.bundle, o.verify.secret);
    c.verify->add_flag("--against-store", o.verify.against_store,
                       "Also compare the bundle with the live store (by key check values)");
    c.verify->add_option("--jobs,-j", o.verify.jobs, jobs_help)->check(CLI::Range(1, 64));

    c.backup = app.add_subcommand(
        "backup", "Key store v1 backup (acra-backup): one file, and a backup key shown once");
    c.backup->add_option("--action", o.backup.action, "export or import")
        ->required()
        ->check(CLI::IsMember({"export", "import"}));
    c.backup->add_option("--file", o.backup.file, "The backup file")->required();
    c.backup->add_option("--backup-key-out", o.backup.key_out,
                         "Export: where to show the backup key when there is no terminal: an open "
                         "file descriptor number, or a new file (0600)");
    c.backup->add_flag("--init", o.backup.init, "Import: create the v1 store and its master key first");
    c.backup->add_flag("--merge", o.backup.merge,
                       "Import: add to a store that already holds other keys (never overwrites)");
    c.backup->add_flag("--dry-run", o.backup.dry_run, "Import: verify and list; write nothing");
    c.backup->add_option("--keys_private_dir,--keys-private-dir", o.backup.keys_private_dir,
                         "Acra's name for the key store directory (same as --keystore)");
    c.backup->add_option("--keys_public_dir,--keys-public-dir", o.backup.keys_public_dir,
                         "Acra's name for the public key directory: keywarden keeps both halves in "
                         "the one store directory, so it must be that directory");
    c.backup->add_option("--master-encryption-key", o.backup.init_options.master_encryption_key,
                         "Import --init: use this existing token key (pkcs11: URI) as the master key");
    c.backup->add_flag("--allow-extractable-master", o.backup.init_options.allow_extractable_master,
                       "Import --init: accept an extractable master key");

    c.migrate = app.add_subcommand("migrate", "Move every key of a v1 store into a v2 store, all or nothing");
    c.migrate->add_option("--src-keystore,--src_keystore", o.migrate.src, "The v1 store")->required();
    c.migrate->add_option("--dst-keystore,--dst_keystore", o.migrate.dst,
                          "The v2 store (create it first with keywarden init)")
        ->required();
    c.migrate->add_option("--dst-token", o.migrate.dst_token,
                          "The destination's token (default: the one its store.json names)");
    c.migrate->add_option("--dst-module", o.migrate.dst_module,
                          "The destination's PKCS#11 module (default: --module)");
    c.migrate->add_option("--dst-pin-source", o.migrate.dst_pin_source,
                          "Where the destination token's PIN comes from (default: --pin-source)");
    c.migrate->add_flag("--dry-run", o.migrate.dry_run, "List what would move; write nothing");
    c.migrate->add_flag("--force", o.migrate.force,
                        "Allow a destination that already holds other keys (they are left as they are)");

    for (CLI::App* sub : {c.init, c.generate, c.rotate, c.list, c.read, c.destroy, c.keystore,
                          c.keystore_verify, c.exp, c.imp, c.verify, c.backup, c.migrate})
        sub->footer(kExitCodes);
    return c;
}

int run(int argc, char** argv) {
    CLI::App app{"keywarden: an application key store whose master keys never leave a PKCS#11 "
                 "token, with backups that restore",
                 "keywarden"};
    Options o;
    const GlobalOptions& g = o.g;
    Commands c = build_cli(app, o);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        // "keywarden frobnicate": CLI11 reports the missing subcommand; name the word instead.
        std::string what = e.what();
        auto rest = app.remaining();
        if (what.find("subcommand is required") != std::string::npos && !rest.empty() && !rest.front().starts_with("-"))
            what = "unknown command '" + rest.front() + "'";
        std::cerr << "error: " << what << "\n"
                  << "hint: run 'keywarden --help' or 'keywarden COMMAND --help'\n";
        return static_cast<int>(ExitCode::usage);
    }
    log::set_verbosity(g.verbose);
    pkcs11::set_trace_echo(g.verbose >= 2);
    try {
        // Bad values are refused before anything is done.
        pkcs11::token_restart_every();
        pkcs11::token_batch();
    } catch (const Error& e) {
        std::cerr << "error: " << e.what() << "\nhint: " << e.hint() << "\n";
        return static_cast<int>(e.exit_code());
    }
    if (!secure_heap_active())
        log::info("the locked secure heap could not be set up (RLIMIT_MEMLOCK?): secrets are "
                  "still wiped on free, but may be swapped");

    if (c.token_list->parsed()) return run_token_list(g);
    if (c.token_check->parsed()) return run_token_check(g);
    if (c.init->parsed()) return run_init(g, o.init);
    if (c.generate->parsed()) return run_generate(g, o.generate);
    if (c.rotate->parsed()) return run_rotate(g, o.rotate);
    if (c.list->parsed()) return run_list(g, o.list);
    if (c.read->parsed()) return run_read(g, o.read);
    if (c.destroy->parsed()) return run_destroy(g, o.destroy);
    if (c.keystore_verify->parsed()) return run_keystore_verify(g);
    if (c.exp->parsed()) return run_export(g, o.exp);
    if (c.imp->parsed()) return run_import(g, o.imp);
    if (c.verify->parsed()) return run_verify_bundle(g, o.verify);
    if (c.backup->parsed()) return run_backup_v1(g, o.backup);
    if (c.migrate->parsed()) return run_migrate(g, o.migrate);
    std::cerr << "error: no command given\n";
    return static_cast<int>(ExitCode::usage);
}

}  // namespace keywarden::cli

int main(int argc, char** argv) {
    using namespace keywarden;
    // Before any key or PIN is in memory: no core dumps, and a locked heap for secrets.
    if (!disable_core_dumps()) log::warn("could not disable core dumps");
    // A file size limit (ulimit -f) must give a write error to clean up after, not a kill.
    std::signal(SIGXFSZ, SIG_IGN);
    init_secure_heap();
    try {
        return cli::run(argc, argv);
    } catch (const Error& e) {
        std::cerr << "error: " << e.what() << "\n";
        if (!e.hint().empty()) std::cerr << "hint: " << e.hint() << "\n";
        return static_cast<int>(e.exit_code());
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return static_cast<int>(ExitCode::failure);
    }
}
