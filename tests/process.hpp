// SPDX-License-Identifier: Apache-2.0
// The one process runner of the tests and the benches: posix_spawn with a changed environment,
// stdin from /dev/null, stdout and stderr captured or sent to files, and wait4()'s rusage.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace kwtest {

// Changes to this process's environment for a child: a value sets a variable, nullopt unsets it.
using EnvChanges = std::map<std::string, std::optional<std::string>>;

struct ProcessOptions {
    // Empty: captured into ProcessResult::out / err. Otherwise the file it is written to (created
    // or truncated, 0600); "/dev/null" discards it.
    std::string out_path, err_path;
    // A new session (setsid): the child has no controlling terminal, so /dev/tty cannot be opened.
    bool new_session = false;
    // The child's whole environment ("NAME=value"), used as it is instead of this process's with
    // the changes applied (the benches' spawner, forked before the bench set its variables).
    std::optional<std::vector<std::string>> environment;
};

struct ProcessResult {
    int code = -1;  // exit code, or 128 + the signal that ended it
    std::string out, err;
    double wall = 0;      // spawn to wait4, seconds
    long maxrss_kib = 0;  // wait4's ru_maxrss
    double user = 0, sys = 0;
};

// The child's environment: this process's, with `changes` applied, as "NAME=value" strings.
std::vector<std::string> child_environment(const EnvChanges& changes);

// Runs argv (argv[0] looked up in PATH when it has no '/'); only descriptors 0, 1 and 2 reach it.
// Throws std::runtime_error when it cannot be started.
ProcessResult run_process(const std::vector<std::string>& argv, const EnvChanges& env = {},
                          const ProcessOptions& options = {});

}  // namespace kwtest
