// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>

#include "keywarden/error.hpp"
#include "keywarden/pin.hpp"
#include "support.hpp"

using namespace keywarden;

namespace {
std::string str(const SecureBytes& b) { return std::string(as_string_view(b)); }
}  // namespace

TEST_CASE("PIN source specs", "[unit]") {
    struct Row {
        const char* spec;
        PinSource::Kind kind;
        const char* arg;
    };
    const Row good[] = {
        {"env:MY_PIN", PinSource::Kind::env, "MY_PIN"},
        {"file:/run/pin", PinSource::Kind::file, "/run/pin"},
        {"file:///run/pin", PinSource::Kind::file, "/run/pin"},  // RFC 7512 pin-source as file URI
        {"file:relative/pin", PinSource::Kind::file, "relative/pin"},
        {"/etc/keywarden/pin", PinSource::Kind::file, "/etc/keywarden/pin"},
        {"prompt", PinSource::Kind::prompt, ""},
    };
    for (const auto& r : good) {
        INFO(r.spec);
        auto s = parse_pin_source(r.spec);
        CHECK(s.kind == r.kind);
        CHECK(s.arg == r.arg);
    }
    // A PIN is never a plain value, and the message never echoes what was given.
    const char* bad[] = {"1234", "", "env:", "file:", "pin:1234", "value:1234", "123456789012345678"};
    for (const char* spec : bad) {
        INFO(spec);
        try {
            parse_pin_source(spec);
            FAIL("accepted");
        } catch (const UsageError& e) {
            CHECK(e.exit_code() == ExitCode::usage);
            CHECK(e.hint().find("never accepted as a command-line value") != std::string::npos);
            CHECK(std::string(e.what()).find("1234") == std::string::npos);
        }
    }
}

TEST_CASE("reading PINs from every source", "[unit]") {
    auto dir = kwtest::make_temp_dir();
    ::setenv("KW_TEST_PIN", "s3cret", 1);
    CHECK(str(read_pin({PinSource::Kind::env, "KW_TEST_PIN"})) == "s3cret");
    ::setenv("KW_TEST_EMPTY", "", 1);
    ::unsetenv("KW_TEST_UNSET");
    CHECK_THROWS_AS(read_pin({PinSource::Kind::env, "KW_TEST_EMPTY"}), TokenError);
    CHECK_THROWS_WITH(read_pin({PinSource::Kind::env, "KW_TEST_UNSET"}),
                      Catch::Contains("KW_TEST_UNSET is not set"));

    struct Row {
        const char* content;
        const char* pin;
    };
    const Row files[] = {{"1234\n", "1234"}, {"1234", "1234"}, {"ab cd\r\nignored\n", "ab cd"}};
    for (const auto& r : files) {
        INFO(r.content);
        kwtest::write_file(dir + "/pin", r.content);
        CHECK(str(read_pin({PinSource::Kind::file, dir + "/pin"})) == r.pin);
    }
    kwtest::write_file(dir + "/empty", "");
    CHECK_THROWS_WITH(read_pin({PinSource::Kind::file, dir + "/empty"}), Catch::Contains("is empty"));
    CHECK_THROWS_WITH(read_pin({PinSource::Kind::file, dir + "/missing"}),
                      Catch::Contains("cannot open PIN file"));
    std::filesystem::remove_all(dir);
}

TEST_CASE("default PIN source: KEYWARDEN_PIN first", "[unit]") {
    const char* saved = std::getenv("KEYWARDEN_PIN");
    std::string saved_s = saved ? saved : "";
    ::setenv("KEYWARDEN_PIN", "x", 1);
    auto d = default_pin_source();
    REQUIRE(d);
    CHECK(d->kind == PinSource::Kind::env);
    CHECK(d->arg == "KEYWARDEN_PIN");
    ::unsetenv("KEYWARDEN_PIN");
    auto none = default_pin_source();
    // Without the variable it is a prompt only on a terminal.
    if (isatty(0)) CHECK((none && none->kind == PinSource::Kind::prompt));
    else CHECK_FALSE(none);
    if (saved) ::setenv("KEYWARDEN_PIN", saved_s.c_str(), 1);
}
