// SPDX-License-Identifier: Apache-2.0
// The CLI boundary: parse, dispatch, and map every error to a documented exit code.
#include <cstdio>
#include <iostream>

#include "keywarden/log.hpp"
#include "version.hpp"
#include "options.hpp"

namespace keywarden::cli {

namespace {
constexpr const char* kExitCodes =
    "Exit codes: 0 ok, 1 failure, 2 usage error, 3 token or PIN problem, 4 integrity failure.";
}

Commands build_cli(CLI::App& app, GlobalOptions& g) {
    app.footer(kExitCodes);
    app.set_version_flag("--version", std::string("keywarden ") + KEYWARDEN_VERSION);
    app.set_config("--config", "", "Read options from a CLI11 (TOML/INI) config file");
    app.require_subcommand(1);
    // Global options may follow the subcommand: `keywarden token list --json`.
    app.fallthrough();

    app.add_option("--module", g.module,
                   "PKCS#11 module: a file path, or the name p11-kit registers it under")
        ->envname("KEYWARDEN_MODULE");
    app.add_option("--module-init-args", g.module_init_args,
                   "String passed as CK_C_INITIALIZE_ARGS.pReserved (p11-kit x-init-reserved)");
    app.add_option("--token", g.token,
                   "Token: a pkcs11: URI (RFC 7512), label:NAME, serial:NUMBER, or a bare label "
                   "or serial")
        ->envname("KEYWARDEN_TOKEN");
    app.add_option("--pin-source", g.pin_source,
                   "Where the PIN comes from: env:VAR, file:PATH or prompt (default: "
                   "$KEYWARDEN_PIN, then a prompt on a terminal). Never the PIN itself.")
        ->envname("KEYWARDEN_PIN_SOURCE");
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
    return c;
}

int run(int argc, char** argv) {
    CLI::App app{"keywarden: an application key store whose master keys never leave a PKCS#11 "
                 "token, with backups that restore",
                 "keywarden"};
    GlobalOptions g;
    Commands c = build_cli(app, g);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::cerr << "error: " << e.what() << "\n"
                  << "hint: run 'keywarden --help' or 'keywarden COMMAND --help'\n";
        return static_cast<int>(ExitCode::usage);
    }
    log::set_verbosity(g.verbose);
    pkcs11::set_trace_echo(g.verbose >= 2);

    if (c.token_list->parsed()) return run_token_list(g);
    if (c.token_check->parsed()) return run_token_check(g);
    std::cerr << "error: no command given\n";
    return static_cast<int>(ExitCode::usage);
}

}  // namespace keywarden::cli

int main(int argc, char** argv) {
    using namespace keywarden;
    // Before any key or PIN is in memory: no core dumps, and a locked heap for secrets.
    if (!disable_core_dumps()) log::warn("could not disable core dumps");
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
