// SPDX-License-Identifier: Apache-2.0
// keywarden token list / token check
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "keywarden/token_check.hpp"
#include "options.hpp"

namespace keywarden::cli {

namespace {

std::string hex_slot(CK_SLOT_ID id) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(id));
    return buf;
}

nlohmann::json opt_json(const std::optional<CK_ULONG>& v) {
    return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
}

// A maximum of CK_EFFECTIVELY_INFINITE (0) means no limit.
nlohmann::json total_json(const std::optional<CK_ULONG>& v) {
    if (v && *v == CK_EFFECTIVELY_INFINITE) return "unlimited";
    return opt_json(v);
}

std::string opt_text(const std::optional<CK_ULONG>& v) {
    return v ? std::to_string(*v) : std::string("not reported");
}

std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
    return s;
}

}  // namespace

int run_token_list(const GlobalOptions& g) {
    auto module = pkcs11::load_module(g.tok);
    auto info = module->info();
    auto tokens = pkcs11::list_tokens(*module);
    if (g.json) {
        nlohmann::json out;
        out["module"] = {{"path", module->path()},
                         {"manufacturer", pkcs11::trim_field(info.manufacturerID,
                                                             sizeof info.manufacturerID)},
                         {"description", pkcs11::trim_field(info.libraryDescription,
                                                            sizeof info.libraryDescription)}};
        out["slots"] = nlohmann::json::array();
        for (const auto& t : tokens) {
            nlohmann::json s = {{"slot", t.slot},
                                {"description", t.slot_description},
                                {"token_present", t.token_present}};
            if (t.token_present) {
                s["token"] = {{"label", t.label},
                              {"serial", t.serial},
                              {"manufacturer", t.manufacturer},
                              {"model", t.model},
                              {"initialized", t.initialized},
                              {"flags", pkcs11::token_flag_names(t.flags)},
                              {"sessions", {{"free", opt_json(t.sessions_free)},
                                            {"total", total_json(t.sessions_total)}}},
                              {"rw_sessions", {{"free", opt_json(t.rw_sessions_free)},
                                               {"total", total_json(t.rw_sessions_total)}}}};
            }
            out["slots"].push_back(std::move(s));
        }
        std::cout << out.dump(2) << "\n";
        return 0;
    }
    std::ostringstream o;
    o << "module: " << module->path() << " ("
      << pkcs11::trim_field(info.libraryDescription, sizeof info.libraryDescription) << ")\n";
    for (const auto& t : tokens) {
        o << "slot " << hex_slot(t.slot) << ": " << t.slot_description << "\n";
        if (!t.token_present) {
            o << "  no token present\n";
            continue;
        }
        if (!t.initialized) {
            o << "  token: not initialised (" << t.manufacturer << ", " << t.model << ")\n";
            continue;
        }
        o << "  token: label '" << t.label << "', serial " << t.serial << "\n"
          << "  manufacturer: " << t.manufacturer << ", model: " << t.model << "\n"
          << "  flags: " << joined(pkcs11::token_flag_names(t.flags)) << "\n";
        // CK_EFFECTIVELY_INFINITE (0) as a maximum means no limit.
        auto total = [](const std::optional<CK_ULONG>& v) {
            return v && *v == CK_EFFECTIVELY_INFINITE ? std::string("unlimited") : opt_text(v);
        };
        o << "  sessions: free " << opt_text(t.sessions_free) << ", total "
          << total(t.sessions_total) << " (read/write: free " << opt_text(t.rw_sessions_free)
          << ", total " << total(t.rw_sessions_total) << ")\n";
    }
    std::cout << o.str();
    return 0;
}

int run_token_check(const GlobalOptions& g) {
    auto ctx = pkcs11::open_token(g.tok, true);
    auto r = pkcs11::check_token(ctx.session);
    if (g.json) {
        nlohmann::json out;
        out["token"] = {{"label", ctx.token.label}, {"serial", ctx.token.serial},
                        {"model", ctx.token.model}};
        out["methods"] = nlohmann::json::array();
        for (const auto& m : r.methods)
            out["methods"].push_back({{"name", m.name},
                                      {"mechanism", m.mechanism},
                                      {"listed", m.listed},
                                      {"works", m.works},
                                      {"detail", m.detail}});
        out["chosen"] = r.chosen.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.chosen);
        out["chosen_implemented"] = r.chosen_implemented;
        out["reason"] = r.chosen_reason;
        std::cout << out.dump(2) << "\n";
    } else {
        std::ostringstream o;
        o << "token '" << ctx.token.label << "' (serial " << ctx.token.serial << ", "
          << ctx.token.model << ")\n";
        for (const auto& m : r.methods) {
            char line[160];
            std::snprintf(line, sizeof line, "  %-18s %-24s %s", m.name.c_str(),
                          m.mechanism.c_str(),
                          m.works ? "works" : (m.listed ? "FAILS" : "unavailable"));
            o << line;
            if (!m.works && m.listed) o << ": " << m.detail;
            o << "\n";
        }
        if (r.chosen.empty())
            o << "keywarden would use: nothing (" << r.chosen_reason << ")\n";
        else
            o << "keywarden would use: " << r.chosen << " (" << r.chosen_reason << ")"
              << (r.chosen_implemented ? "" : "; not implemented in this version yet") << "\n";
        std::cout << o.str();
    }
    return r.chosen_implemented ? 0 : 1;
}

}  // namespace keywarden::cli
