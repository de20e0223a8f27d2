// SPDX-License-Identifier: Apache-2.0
// The project's error types. The CLI boundary maps each to a documented exit code.
#pragma once

#include <stdexcept>
#include <string>

namespace keywarden {

// Exit codes, documented in docs/cli.md and in --help.
enum class ExitCode : int {
    ok = 0,
    failure = 1,
    usage = 2,
    token = 3,      // token missing, PIN wrong or locked, module problems
    integrity = 4,  // a MAC, check value or format does not verify
};

// Base of every error keywarden throws. Carries an operator hint: what to do next.
class Error : public std::runtime_error {
public:
    explicit Error(const std::string& what, std::string hint = {},
                   ExitCode code = ExitCode::failure)
        : std::runtime_error(what), m_hint(std::move(hint)), m_code(code) {}

    const std::string& hint() const noexcept { return m_hint; }
    ExitCode exit_code() const noexcept { return m_code; }

private:
    std::string m_hint;
    ExitCode m_code;
};

// Bad command-line input: exit code 2.
class UsageError : public Error {
public:
    explicit UsageError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::usage) {}
};

// Token or PIN problem that is not a failed PKCS#11 call: exit code 3.
class TokenError : public Error {
public:
    explicit TokenError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::token) {}
};

// A MAC, key check value or authenticated format did not verify: exit code 4.
class IntegrityError : public Error {
public:
    explicit IntegrityError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::integrity) {}
};

// Malformed input that is not an integrity failure (unknown version, bad JSON...).
class FormatError : public Error {
public:
    explicit FormatError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::integrity) {}
};

class NotFoundError : public Error {
public:
    explicit NotFoundError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::failure) {}
};

class ConflictError : public Error {
public:
    explicit ConflictError(const std::string& what, std::string hint = {})
        : Error(what, std::move(hint), ExitCode::failure) {}
};

// An OpenSSL call failed. The constructor drains the thread's ERR queue into the message,
// so a later, unrelated failure never reports this one's leftovers.
class OpenSslError : public Error {
public:
    explicit OpenSslError(const std::string& function);
};

}  // namespace keywarden
