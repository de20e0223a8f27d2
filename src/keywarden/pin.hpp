// SPDX-License-Identifier: Apache-2.0
// Where a PIN comes from. Never a plain argv value.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "keywarden/secure_buffer.hpp"

namespace keywarden {

struct PinSource {
    enum class Kind { env, file, prompt };
    Kind kind = Kind::prompt;
    std::string arg;  // variable name or file path
    std::string describe() const;
};

// Parses "env:VAR", "file:PATH", "prompt", or a URI pin-source ("file:PATH" or an absolute
// path, as RFC 7512 allows). Anything else is refused with a UsageError that says a PIN is never
// taken from the command line.
PinSource parse_pin_source(std::string_view spec);

// The default when nothing was given: env:KEYWARDEN_PIN if that variable is set, then a prompt
// when stdin is a terminal; otherwise nullopt.
std::optional<PinSource> default_pin_source();

// Reads the PIN. env: the variable must exist and be non-empty. file: the first line, without its
// line ending; a group- or world-readable file draws a warning. prompt: /dev/tty, echo off.
SecureBytes read_pin(const PinSource& src, std::string_view prompt = "PIN: ");

}  // namespace keywarden
