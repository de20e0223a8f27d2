// SPDX-License-Identifier: Apache-2.0
// keywarden backup --action=export|import (key store v1) and keywarden migrate (v1 -> v2).
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "keywarden/backup_v1.hpp"
#include "keywarden/migrate.hpp"
#include "options.hpp"
#include "store_context.hpp"

namespace keywarden::cli {

namespace {

// --keys_private_dir / --keys_public_dir name the store directory, as in acra-backup.
std::string v1_store_path(const GlobalOptions& g, const BackupV1Options& o) {
    namespace fs = std::filesystem;
    std::string path = keystore_path(g);
    std::string given;
    for (const auto* d : {&o.keys_private_dir, &o.keys_public_dir}) {
        if (d->empty()) continue;
        if (!given.empty() && fs::absolute(*d).lexically_normal() != fs::absolute(given).lexically_normal())
            throw UsageError("--keys_private_dir and --keys_public_dir name different directories",
                             "a keywarden v1 store keeps both halves of every key in one directory: "
                             "give that directory once");
        given = *d;
    }
    if (!given.empty() && !g.keystore.empty() &&
        fs::absolute(given).lexically_normal() != fs::absolute(g.keystore).lexically_normal())
        throw UsageError("--keystore and --keys_private_dir name different directories");
    return given.empty() ? path : given;
}

}  // namespace

namespace {

// backup --action=export: the backup key's destination (a descriptor the operator opened is
// duplicated before keywarden opens anything of its own), then the backup and its summary.
int run_backup_v1_export(const GlobalOptions& g, const BackupV1Options& o, const std::string& store_path) {
    backup::V1ExportOptions eo;
    eo.file = o.file;
    eo.key_out = o.key_out;
    if (!o.key_out.empty() && o.key_out.size() < 6 &&
        o.key_out.find_first_not_of("0123456789") == std::string::npos) {
        // A descriptor the operator opened: duplicated now, before keywarden opens anything
        // of its own, so that a number can never name the store's lock file or the token.
        int n = std::stoi(o.key_out);
        if (n <= 2)
            throw UsageError("--backup-key-out " + o.key_out + " would put the backup key on " +
                                 (n == 0 ? "standard input" : n == 1 ? "stdout" : "stderr") +
                                 ", which is often captured or logged",
                             "open a descriptor for it (e.g. 3>key.txt ... --backup-key-out 3), or "
                             "give a new file's path");
        eo.key_fd = ::fcntl(n, F_DUPFD_CLOEXEC, 3);
        if (eo.key_fd < 0)
            throw UsageError("--backup-key-out " + o.key_out + ": file descriptor " + o.key_out + " is not open",
                             "open it in the shell (e.g. 3>key.txt), or give a path");
        eo.key_fd_name = "file descriptor " + o.key_out;
        eo.key_out.clear();
    }
    eo.progress = progress_bar("backing up");
    auto s = keystore::open_any_store(g.tok, store_path, false);
    auto sum = backup::export_v1_backup(s, eo);
    if (g.json)
        std::cout << nlohmann::json{{"file", o.file},
                                    {"bundle_id", sum.bundle_id},
                                    {"keys", sum.rings},
                                    {"key_versions", sum.entries},
                                    {"wrapped_keys", sum.wrapped_keys},
                                    {"bytes", sum.bytes},
                                    {"seconds", sum.seconds},
                                    {"verified", true},
                                    {"backup_key_shown_on", sum.key_shown_on}}
                         .dump(2)
                  << "\n";
    std::cerr << "backed up " << sum.rings << " keys (" << sum.entries << " key versions) to " << o.file
              << ": " << sum.bytes << " bytes in " << sum.seconds
              << " s; the file was read back and verified\n"
              << "the backup key was shown once, on " << sum.key_shown_on
              << ". It is not stored anywhere else: without it the backup cannot be restored.\n"
              << "REMEMBER: store " << o.file << " and the backup key in different places; whoever "
              << "holds both holds every key.\n";
    return 0;
}

// backup --action=import: BACKUP_MASTER_KEY opens the file; a dry run says what would happen.
int run_backup_v1_import(const GlobalOptions& g, const BackupV1Options& o, const std::string& store_path) {
    backup::V1ImportOptions io;
    io.file = o.file;
    io.keystore_path = store_path;
    io.init = o.init;
    io.init_params.master_encryption_key = o.init_options.master_encryption_key;
    io.init_params.allow_extractable_master = o.init_options.allow_extractable_master;
    io.merge = o.merge;
    io.dry_run = o.dry_run;
    io.progress = progress_bar(o.dry_run ? "checking" : "restoring");
    SecureBytes key = backup::backup_key_from_env();
    auto sum = backup::import_v1_backup(g.tok, key, io);
    if (g.json) {
        nlohmann::json j{{"bundle_id", sum.bundle_id},
                         {"dry_run", sum.dry_run},
                         {"keys", sum.key_ids},
                         {"key_versions", sum.entries},
                         {"conflicts", sum.conflicts},
                         {"refused", sum.refused.empty() ? nlohmann::json(nullptr) : nlohmann::json(sum.refused)},
                         {"seconds", sum.seconds}};
        if (sum.dry_run) j["unwrapped_in_token"] = sum.unwrapped_in_token;
        std::cout << j.dump(2) << "\n";
    } else if (sum.dry_run) {
        for (const auto& k : sum.key_ids)
            std::cout << (std::find(sum.conflicts.begin(), sum.conflicts.end(), k) != sum.conflicts.end()
                              ? "conflict "
                              : "import   ")
                      << k << "\n";
    }
    if (sum.dry_run) {
        if (!sum.refused.empty()) {
            std::cerr << dry_run_verified("backup", sum.unwrapped_in_token)
                      << ", but the import would be refused: " << sum.refused << "\n";
            return static_cast<int>(ExitCode::failure);
        }
        std::cerr << dry_run_verified("backup", sum.unwrapped_in_token) << "; " << sum.rings << " keys (" << sum.entries
                  << " key versions) would be restored; nothing was written\n";
        return 0;
    }
    std::cerr << "restored " << sum.rings << " keys (" << sum.entries << " key versions) into " << store_path
              << " in " << sum.seconds << " s\n";
    return 0;
}

}  // namespace

int run_backup_v1(const GlobalOptions& g, const BackupV1Options& o) {
    std::string store_path = v1_store_path(g, o);
    bool exporting = o.action == "export";
    if (exporting && (o.init || o.merge || o.dry_run))
        throw UsageError("--init, --merge and --dry-run are import options");
    if (!exporting && !o.key_out.empty()) throw UsageError("--backup-key-out is an export option");
    if (o.init && o.merge) throw UsageError("--init and --merge exclude each other");
    return exporting ? run_backup_v1_export(g, o, store_path) : run_backup_v1_import(g, o, store_path);
}

int run_migrate(const GlobalOptions& g, const MigrateOptions& o) {
    backup::MigrateOptions mo;
    mo.src_path = o.src;
    mo.dst_path = o.dst;
    mo.src_token = g.tok;
    mo.dst_token.token = o.dst_token;
    mo.dst_token.module = o.dst_module;
    mo.dst_token.pin_source = o.dst_pin_source;
    if (!o.dst_module.empty()) mo.dst_token.module_init_args = g.tok.module_init_args;
    mo.dry_run = o.dry_run;
    mo.force = o.force;
    mo.progress = progress_bar("migrating");
    auto sum = backup::migrate_v1_to_v2(mo);
    if (g.json) {
        std::cout << nlohmann::json{{"dry_run", sum.dry_run},
                                    {"moved", sum.dry_run ? nlohmann::json::array() : nlohmann::json(sum.to_move)},
                                    {"would_move", sum.dry_run ? nlohmann::json(sum.to_move) : nlohmann::json::array()},
                                    {"already_present", sum.already_present},
                                    {"destination_only", sum.others},
                                    {"key_versions", sum.versions},
                                    {"same_token", sum.same_token},
                                    {"seconds", sum.seconds}}
                         .dump(2)
                  << "\n";
    } else if (sum.dry_run) {
        for (const auto& k : sum.to_move) std::cout << "move     " << k << "\n";
        for (const auto& k : sum.already_present) std::cout << "present  " << k << "\n";
    }
    if (sum.dry_run) {
        std::cerr << "dry run: " << sum.to_move.size() << " key rings would move, " << sum.already_present.size()
                  << " are already in the destination";
        if (!sum.others.empty())
            std::cerr << "; the destination holds " << sum.others.size() << " other key rings"
                      << (o.force ? "" : ", so the migration would need --force");
        std::cerr << "; nothing was written\n";
        return 0;
    }
    if (sum.to_move.empty())
        std::cerr << "nothing to migrate: all " << sum.already_present.size()
                  << " key rings of the v1 store are already in " << o.dst << " with the same keys\n";
    else
        std::cerr << "migrated " << sum.to_move.size() << " key rings (" << sum.versions << " key versions) from "
                  << o.src << " into " << o.dst << (sum.same_token ? "" : " across two tokens") << " in "
                  << sum.seconds << " s"
                  << (sum.already_present.empty()
                          ? std::string()
                          : "; " + std::to_string(sum.already_present.size()) + " were already there")
                  << "\n";
    return 0;
}

}  // namespace keywarden::cli
