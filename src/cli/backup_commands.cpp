// SPDX-License-Identifier: Apache-2.0
// keywarden export / import / verify
#include <unistd.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "keywarden/backup.hpp"
#include "keywarden/log.hpp"
#include "options.hpp"
#include "store_context.hpp"

namespace keywarden::cli {


int run_export(const GlobalOptions& g, const ExportOptions& o) {
    if (o.all == !o.key_ids.empty())
        throw UsageError("say what to export: --all, or a list of key ids");
    backup::ExportOptions eo;
    eo.bundle_path = o.bundle;
    eo.secret_path = o.secret;
    eo.all = o.all;
    eo.private_keys = o.private_keys;
    eo.jobs = o.jobs;
    for (const auto& k : o.key_ids) eo.ids.push_back(keystore::KeyId::parse(k));
    eo.progress = progress_bar("exporting");
    // --all reads the store in one streamed pass: memory does not grow with the store.
    auto s = o.all ? with_store_streaming(g) : with_store(g, false);
    auto sum = backup::export_bundle(s, eo);
    if (g.json) {
        std::cout << nlohmann::json{{"bundle", o.bundle},
                                    {"secret", o.secret},
                                    {"bundle_id", sum.bundle_id},
                                    {"key_rings", sum.rings},
                                    {"entries", sum.entries},
                                    {"wrapped_keys", sum.wrapped_keys},
                                    {"bytes", sum.bytes},
                                    {"seconds", sum.seconds},
                                    {"verified", true}}
                         .dump(2)
                  << "\n";
    }
    std::cerr << "exported " << sum.rings << " key rings (" << sum.entries << " key versions, "
              << sum.wrapped_keys << " private or symmetric keys) to " << o.bundle << ": " << sum.bytes
              << " bytes in " << sum.seconds << " s; the bundle was read back and verified\n"
              << "REMEMBER: store " << o.bundle << " and " << o.secret << " in different places. "
              << (o.private_keys ? "Whoever holds both holds every key in it"
                                 : "Whoever holds both can read which keys it names")
              << "; losing the secret loses the backup.\n";
    return 0;
}

namespace {
// "keeps version 3, which the bundle does not hold" / "keeps versions 3, 4, which ..."
std::string kept_text(const std::vector<std::uint32_t>& versions) {
    std::string list;
    for (auto v : versions) list += (list.empty() ? "" : ", ") + std::to_string(v);
    return std::string("keeps version") + (versions.size() == 1 ? " " : "s ") + list +
           ", which the bundle does not hold";
}
}  // namespace

int run_import(const GlobalOptions& g, const ImportOptions& o) {
    backup::ImportOptions io;
    io.bundle_path = o.bundle;
    io.secret_path = o.secret;
    io.keystore_path = keystore_path(g);
    io.init = o.init;
    io.init_params.master_encryption_key = o.init_options.master_encryption_key;
    io.init_params.master_signature_key = o.init_options.master_signature_key;
    io.init_params.allow_extractable_master = o.init_options.allow_extractable_master;
    io.merge = o.merge;
    io.on_conflict = o.on_conflict == "skip"        ? backup::OnConflict::skip
                     : o.on_conflict == "overwrite" ? backup::OnConflict::overwrite
                                                    : backup::OnConflict::abort;
    if (o.on_conflict != "abort" && !o.merge) throw UsageError("--on-conflict goes with --merge");
    if (o.init && o.merge) throw UsageError("--init and --merge exclude each other");
    io.dry_run = o.dry_run;
    io.jobs = o.jobs;
    io.progress = progress_bar(o.dry_run ? "checking" : "importing");
    auto sum = backup::import_bundle(g.tok, io);
    if (g.json) {
        nlohmann::json j{{"bundle_id", sum.bundle_id},
                         {"dry_run", sum.dry_run},
                         {"key_rings", sum.rings},
                         {"entries", sum.entries},
                         {"wrapped_keys", sum.wrapped_keys},
                         {"imported", sum.imported},
                         {"conflicts", sum.conflicts},
                         {"skipped", sum.skipped},
                         {"kept_versions", sum.kept},
                         {"replaced_versions", sum.replaced},
                         {"seconds", sum.seconds}};
        if (sum.dry_run) j["unwrapped_in_token"] = sum.unwrapped_in_token;
        std::cout << j.dump(2) << "\n";
    } else if (sum.dry_run) {
        for (const auto& k : sum.imported) {
            std::cout << (std::find(sum.conflicts.begin(), sum.conflicts.end(), k) != sum.conflicts.end()
                              ? "overwrite "
                              : "import    ")
                      << k;
            if (auto kept = sum.kept.find(k); kept != sum.kept.end()) std::cout << " (" << kept_text(kept->second) << ")";
            std::cout << "\n";
        }
        for (const auto& k : sum.skipped) std::cout << "skip      " << k << "\n";
    }
    if (sum.dry_run && !sum.refused.empty()) {
        std::cerr << dry_run_verified("bundle", sum.unwrapped_in_token)
                  << ", but the import would be refused: " << sum.refused << "\n"
                  << "hint: " << sum.refused_hint << "\n";
        return static_cast<int>(ExitCode::failure);
    }
    if (sum.dry_run)
        std::cerr << dry_run_verified("bundle", sum.unwrapped_in_token) << "; " << sum.imported.size()
                  << " key rings would be imported ("
                  << sum.conflicts.size() << " of them conflict with the store"
                  << (sum.skipped.empty() ? "" : ", " + std::to_string(sum.skipped.size()) + " skipped")
                  << "); nothing was written\n";
    else
        std::cerr << "imported " << sum.rings_written << " key rings (" << sum.entries_written
                  << " key versions) into " << io.keystore_path << " in " << sum.seconds << " s"
                  << (sum.skipped.empty() ? "" : "; skipped " + std::to_string(sum.skipped.size()) + " conflicting")
                  << (sum.kept.empty() ? ""
                                       : "; kept " + std::to_string(sum.kept_count()) +
                                             (sum.kept_count() == 1 ? " version" : " versions") +
                                             " of overwritten rings that the bundle does not hold "
                                             "(see --dry-run)")
                  << "\n";
    return 0;
}

int run_verify_bundle(const GlobalOptions& g, const VerifyBundleOptions& o) {
    std::optional<keystore::OpenStore> store;
    pkcs11::TokenContext token;
    if (o.against_store) {
        store.emplace(with_store(g, false));
        token = store->token;
    } else {
        pkcs11::TokenOptions tok = g.tok;
        // Without --token, the trial unwrap runs on the token of the store at --keystore, if any.
        if (tok.token.empty()) {
            try {
                auto storage = keystore::open_file_storage(keystore_path(g));
                if (storage->exists()) tok.token = "serial:" + keystore::read_store_meta(*storage).token_serial;
            } catch (const Error&) {
                // No usable store there: fall back to the only token, or ask for --token.
            }
        }
        token = pkcs11::open_token(tok, true);
    }
    auto rep = backup::verify_bundle(o.bundle, o.secret, token, store ? store->store.get() : nullptr,
                                     progress_bar("verifying"), o.jobs);
    bool comparison_ok = rep.missing.empty() && rep.extra.empty() && rep.different.empty();
    if (g.json) {
        nlohmann::json problems = nlohmann::json::array();
        for (const auto& p : rep.problems) problems.push_back({{"key", p.key_id}, {"problem", p.problem}});
        nlohmann::json out{{"ok", rep.ok()},
                           {"bundle_id", rep.header.bundle_id},
                           {"created", keystore::format_time(rep.header.created)},
                           {"private_keys", rep.header.private_keys},
                           {"key_rings", rep.header.rings},
                           {"entries", rep.entries},
                           {"unwrapped_in_token", rep.unwrapped},
                           {"problems", problems}};
        if (o.against_store)
            out["against_store"] = {{"compared", rep.compared},
                                    {"missing", rep.missing},
                                    {"extra", rep.extra},
                                    {"different", rep.different},
                                    {"store_keys_not_covered", rep.not_covered}};
        std::cout << out.dump(2) << "\n";
    } else {
        for (const auto& p : rep.problems) std::cout << "PROBLEM " << p.key_id << ": " << p.problem << "\n";
        for (const auto& k : rep.different) std::cout << "DIFFERENT " << k << " (check values differ)\n";
        for (const auto& k : rep.missing) std::cout << "NOT IN BUNDLE " << k << "\n";
        for (const auto& k : rep.extra) std::cout << "NOT IN STORE " << k << "\n";
        std::cout << (!rep.ok() ? "FAILED" : comparison_ok ? "OK" : "DIFFERS") << ": bundle "
                  << rep.header.bundle_id << " made " << keystore::format_time(rep.header.created) << ", "
                  << rep.header.rings << " key rings, " << rep.entries << " entries, " << rep.unwrapped
                  << " keys unwrapped and checked in the token";
        if (o.against_store && !rep.compared)
            std::cout << "; not compared with the store: the bundle failed its checks";
        else if (o.against_store)
            std::cout << (comparison_ok ? "; matches the store" : "; differs from the store")
                      << (rep.not_covered ? " (" + std::to_string(rep.not_covered) +
                                                " store keys are in rings this bundle does not hold)"
                                          : std::string());
        std::cout << "\n";
        if (!rep.header.private_keys)
            std::cerr << "note: this bundle holds public keys only (exported without --private-keys): it "
                         "cannot restore any private or symmetric key\n";
    }
    if (!rep.ok()) return static_cast<int>(ExitCode::integrity);
    return comparison_ok ? 0 : static_cast<int>(ExitCode::failure);
}

}  // namespace keywarden::cli
