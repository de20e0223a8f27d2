// SPDX-License-Identifier: Apache-2.0
// verify: a bundle checked without restoring it (its MAC, counts, every key unwrapped in the token).
#include "keywarden/backup.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <sys/file.h>

#include <ctime>

#include <nlohmann/json.hpp>

#include "bundle_io.hpp"
#include "internal.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/log.hpp"
#include "keywarden/planned_keys.hpp"
#include "keywarden/token_protector.hpp"

namespace keywarden::backup {

// ---- verify ---------------------------------------------------------------------------------

namespace detail {

// Unwraps one entry's key under the backup key in the token and checks its key check value
// there; the session object is destroyed on return. Returns the problem, if any.
std::optional<std::string> trial_unwrap(pkcs11::AesWrapProtector& under_backup, pkcs11::TokenKeyBackend& backend,
                                        const detail::Entry& e) {
    const auto& m = e.meta;
    try {
        auto k = under_backup.unprotect(e.wrapped, {m.key_type, m.key_length}, Exposure::sensitive);
        if (!same_bytes(backend.check_value(*k, m.public_key), m.kcv))
            throw IntegrityError("the key's check value differs from its record");
        return std::nullopt;
    } catch (const TokenError&) {
        throw;  // the token's failure, not the bundle's
    } catch (const pkcs11::Pkcs11Error&) {
        throw;  // unprotect() reports a blob that does not unwrap as an IntegrityError
    } catch (const Error& err) {
        return std::string(err.what());
    }
}

}  // namespace detail

std::size_t detail::dry_run_unwrap(const std::string& path, const SecretFile& secret, pkcs11::TokenContext& token,
                                   const std::string& bundle_id, std::size_t entries, const Progress& progress,
                                   const std::string& what, const std::string& refused, const std::string& hint) {
    VerifyReport rep = verify_bundle_beside(path, path, secret, token, nullptr, progress, 1);
    if (rep.header.bundle_id != bundle_id || rep.entries != entries)
        throw IntegrityError("the " + what + " file changed while the dry run read it",
                             "run the dry run again when nothing writes the file");
    if (rep.ok()) return rep.unwrapped;
    std::string text = "the " + what + " does not restore: " + first_problem(rep);
    if (!refused.empty()) text += "; the import would also be refused: " + refused;
    throw IntegrityError(text, hint);
}

std::string detail::first_problem(const VerifyReport& rep) {
    if (rep.problems.empty()) return "no problem";
    const auto& first = rep.problems.front();
    std::string text = first.key_id == "bundle" ? first.problem : first.key_id + ": " + first.problem;
    if (const std::size_t more = rep.problems.size() - 1)
        text += " (and " + std::to_string(more) + (more == 1 ? " more problem)" : " more problems)");
    return text;
}

void detail::check_written(const VerifyReport& rep, std::size_t entries, std::size_t wrapped, const std::string& what) {
    std::string problem;
    if (!rep.ok()) problem = first_problem(rep);
    else if (rep.entries != entries || rep.unwrapped != wrapped)
        problem = "it holds " + std::to_string(rep.entries) + " entries with " + std::to_string(rep.unwrapped) +
                  " keys, where " + std::to_string(entries) + " entries with " + std::to_string(wrapped) +
                  " keys were written";
    else return;
    const bool v1 = what == "backup";
    throw IntegrityError(
        "the " + what + " just written does not verify: " + problem,
        std::string(v1 ? "nothing was written and no backup key was shown" : "nothing was written") +
            ": the token or the disk gave back other data than the " + (v1 ? "backup" : "export") +
            " wrote, or the store holds a key whose check value differs from its record. Check the token with "
            "'keywarden token check', the store with 'keywarden keystore verify', and the disk; then run the " +
            (v1 ? "backup" : "export") + " again");
}

VerifyReport verify_bundle(const std::string& bundle_path, const std::string& secret_path,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress, std::size_t jobs) {
    // A killed export's temp copy of this secret file holds the backup keys: it goes too.
    remove_stale_leftovers(secret_path);
    return verify_bundle(bundle_path, parse_secret_file(detail::read_secret_file(secret_path)), token,
                         against, progress, jobs);
}

VerifyReport verify_bundle(const std::string& bundle_path, const SecretFile& secret,
                           pkcs11::TokenContext& token, const keystore::Store* against,
                           const Progress& progress, std::size_t jobs) {
    remove_stale_leftovers(bundle_path);
    return detail::verify_bundle_beside(bundle_path, bundle_path, secret, token, against, progress, jobs);
}

namespace {

// The first n tab-separated fields of a worker's line, the last one taking the rest of the line
// (empty fields where the line has fewer).
std::vector<std::string_view> tab_fields(std::string_view line, std::size_t n) {
    std::vector<std::string_view> out;
    while (out.size() + 1 < n) {
        auto tab = line.find('\t');
        if (tab == std::string_view::npos) break;
        out.push_back(line.substr(0, tab));
        line.remove_prefix(tab + 1);
    }
    out.push_back(line);
    out.resize(n);
    return out;
}

// An error message as one line of a worker's output.
std::string one_line(std::string s) {
    std::replace(s.begin(), s.end(), '\n', ' ');
    return s;
}

// One worker of verify's pass 2 (trial_unwrap_all): reads the bundle itself and unwraps the
// keys of the chunks it takes, reporting as lines (see trial_unwrap_all).
void verify_worker(pipeline::Worker& w, const std::string& bundle_path, const SecretFile& secret,
                   CK_MECHANISM_TYPE mech) {
    detail::BundleReader mine(bundle_path, secret);
    TokenBackupKey backup(w.token(), secret.encryption, mech);
    pkcs11::TokenRecycler recycler(w.token(), [&] { backup.rebind(); });
    // One job reads and decrypts every entry: a second thread does that ahead of the
    // token work, handing them over in batches. A worker of N skips the entries of other
    // workers' chunks without decrypting them.
    std::optional<ReadAhead<detail::Entry>> ahead;
    if (!w.forked()) ahead.emplace([&] { return mine.next(); });
    EntryCursor cursor(mine, ahead ? std::function<std::optional<detail::Entry>()>([&] { return ahead->next(); })
                                   : nullptr);
    try {
        std::optional<std::string> previous;  // the key id of the entry before the cursor, once read
        for (bool ended = false; !ended;) {
            auto chunk = w.next();
            if (!chunk) break;
            if (auto before = cursor.entry_before(chunk->first)) previous = before->meta.key_id;
            std::size_t n = 0, unwrapped = 0, started = 0;
            auto counts = [&] {
                w.emit("counts\t" + std::to_string(n) + "\t" + std::to_string(unwrapped) + "\t" +
                       std::to_string(started));
                n = unwrapped = started = 0;
            };
            while (cursor.position() < chunk->last) {
                const std::size_t at = cursor.position();
                auto e = cursor.next();
                if (!e) {
                    ended = true;  // fewer entries than the header says: the MAC pass reports it
                    break;
                }
                ++n;
                if (!previous || *previous != e->meta.key_id) ++started;
                previous = e->meta.key_id;
                if (!e->wrapped.empty()) {
                    if (auto problem = trial_unwrap(backup.under(), backup.backend(), *e))
                        w.emit("problem\t" + std::to_string(at) + "\t" + e->meta.key_id + "@" +
                               std::to_string(e->meta.version) + "\t" + one_line(*problem));
                    else ++unwrapped;
                    recycler.made(1);
                }
                if (n == 256) counts();
            }
            counts();
        }
        cursor.skip_rest();
    } catch (const TokenError&) {
        throw;  // a module restart that failed
    } catch (const pkcs11::Pkcs11Error&) {
        throw;
    } catch (const Error& e) {
        w.emit("failed\t" + one_line(e.what()));
    }
}

// Verify's pass 2: every wrapped key of the bundle unwrapped under the backup key in the token
// and its check value checked there, on the token pipeline. A worker reads the bundle itself
// (for the MAC) and unwraps the keys of the chunks it takes; it reports, as lines merged in entry
// order: "problem\tAT\tKEY@VERSION\tTEXT" for a key that fails, "counts\tENTRIES\tUNWRAPPED\tRINGS"
// every 256 entries and at a chunk's end, and "failed\tTEXT" when the bundle cannot be read
// further. Rings are counted by where they start (an entry with another key id than the entry
// before it), so a worker reads the entry before each of its chunks too; the sum is checked
// against the header. A token failure is the token's, not the bundle's: it is thrown, not
// reported as a problem.
void trial_unwrap_all(const std::string& bundle_path, const std::string& work_near, const SecretFile& secret,
                      CK_MECHANISM_TYPE mech, pkcs11::TokenContext& token, const Progress& progress,
                      std::size_t jobs, VerifyReport& rep) {
    pipeline::Plan plan;
    plan.items = rep.entries;
    plan.jobs = jobs;
    plan.work_near = work_near;
    plan.what = "verify";
    std::size_t entries_done = 0, rings = 0;
    bool failed = false;
    pipeline::run(
        token, plan,
        [&](pipeline::Worker& w) { verify_worker(w, bundle_path, secret, mech); },
        [&](std::string_view line) {
            auto f = tab_fields(line, 4);
            if (f[0] == "counts") {
                entries_done += std::stoul(std::string(f[1]));
                rep.unwrapped += std::stoul(std::string(f[2]));
                rings += std::stoul(std::string(f[3]));
                if (progress) progress(entries_done, rep.header.entries);
            } else if (f[0] == "problem") {
                rep.problems.push_back({std::string(f[2]), std::string(f[3])});
            } else if (f[0] == "failed") {
                failed = true;
                rep.problems.push_back({"bundle", std::string(tab_fields(line, 2)[1])});
            } else {
                throw Error("internal: a verify worker wrote '" + std::string(line) + "'");
            }
        });
    // A reader that fails has said why; otherwise the rings counted must be the header's.
    if (!failed && rings != rep.header.rings)
        rep.problems.push_back({"bundle", detail::counts_differ(bundle_path, rep.entries, rings, rep.header)});
}

}  // namespace

VerifyReport detail::verify_bundle_beside(const std::string& bundle_path, const std::string& work_near,
                                          const SecretFile& secret, pkcs11::TokenContext& token,
                                          const keystore::Store* against, const Progress& progress,
                                          std::size_t jobs) {
    VerifyReport rep;
    detail::BundleReader reader(bundle_path, secret);
    rep.header = reader.header();
    const CK_MECHANISM_TYPE mech = mechanism_of(rep.header.wrap_method);

    std::map<std::string, Bytes> store_kcv;  // "key id@version" -> check value, live keys only
    if (against) {
        for (const auto& id : against->key_ids()) {
            KeyRing r = against->load(id);
            for (const auto& v : r.versions)
                if (v.state != KeyState::destroyed)
                    store_kcv[id.str() + "@" + std::to_string(v.version)] = v.kcv;
        }
    }
    // Pass 1: structure, counts, the whole-file MAC and the comparison with the store. No key
    // is unwrapped before the MAC has verified.
    std::set<std::string> bundle_keys, bundle_rings;
    try {
        if (!against) {
            // Nothing to compare: the MAC alone, without decrypting a single entry.
            reader.check_mac_only();
            rep.entries = rep.header.entries;
        }
        while (auto e = against ? reader.next() : std::nullopt) {
            ++rep.entries;
            const auto& m = e->meta;
            std::string key = m.key_id + "@" + std::to_string(m.version);
            if (!against) continue;  // the sets below would grow with the bundle for nothing
            bundle_keys.insert(key);
            bundle_rings.insert(m.key_id);
            if (m.state != KeyState::destroyed) {
                auto it = store_kcv.find(key);
                if (it == store_kcv.end()) rep.extra.push_back(key);
                else if (!same_bytes(it->second, m.kcv)) rep.different.push_back(key);
            }
        }
    } catch (const Error& e) {
        rep.problems.push_back({"bundle", e.what()});
    }
    // The comparison is complete only when pass 1 read the whole bundle.
    rep.compared = against && rep.problems.empty();
    if (against && !rep.compared) {
        rep.extra.clear();
        rep.different.clear();
    }
    // Pass 2: a trial unwrap of every key in the token, on the token pipeline (one job here, or
    // worker processes that take chunks of entries as they go).
    if (rep.problems.empty()) trial_unwrap_all(bundle_path, work_near, secret, mech, token, progress, jobs, rep);
    if (rep.compared) {
        // Versions missing from rings the bundle holds are differences; rings a selective
        // export did not select are only counted.
        for (const auto& [key, kcv] : store_kcv) {
            if (bundle_keys.count(key)) continue;
            if (bundle_rings.count(key.substr(0, key.rfind('@')))) rep.missing.push_back(key);
            else ++rep.not_covered;
        }
    }
    return rep;
}

}  // namespace keywarden::backup
