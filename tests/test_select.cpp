// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>
#include <cstring>

#include "keywarden/pkcs11.hpp"
#include "support.hpp"

using namespace keywarden;
using namespace keywarden::pkcs11;

namespace {
void pad(CK_UTF8CHAR* field, std::size_t n, const std::string& v) {
    std::memset(field, ' ', n);
    std::memcpy(field, v.data(), std::min(n, v.size()));
}
TokenInfo fake(CK_SLOT_ID slot, const std::string& label, const std::string& serial,
               bool initialized = true) {
    TokenInfo t;
    t.slot = slot;
    t.token_present = true;
    t.initialized = initialized;
    t.label = label;
    t.serial = serial;
    t.model = "Fake";
    pad(t.raw.label, sizeof t.raw.label, label);
    pad(t.raw.serialNumber, sizeof t.raw.serialNumber, serial);
    pad(t.raw.model, sizeof t.raw.model, "Fake");
    pad(t.raw.manufacturerID, sizeof t.raw.manufacturerID, "Test");
    t.raw.flags = initialized ? CKF_TOKEN_INITIALIZED : 0;
    return t;
}
}  // namespace

TEST_CASE("token selection by URI, label and serial", "[unit]") {
    std::vector<TokenInfo> tokens = {fake(7, "alpha", "1111"), fake(3, "beta", "2222"),
                                     fake(9, "twin", "3333"), fake(11, "twin", "4444"),
                                     fake(12, "", "", false)};
    struct Row {
        const char* spec;
        CK_SLOT_ID slot;
    };
    const Row good[] = {
        {"alpha", 7},
        {"2222", 3},
        {"label:beta", 3},
        {"serial:1111", 7},
        {"pkcs11:token=alpha", 7},
        {"pkcs11:serial=4444", 11},
        {"pkcs11:token=twin;serial=3333", 9},
        {"pkcs11:token=beta;manufacturer=Test", 3},
    };
    for (const auto& r : good) {
        INFO(r.spec);
        CHECK(select_token(tokens, r.spec).slot == r.slot);
    }

    struct Bad {
        const char* spec;
        const char* message;
    };
    const Bad bad[] = {
        {"gamma", "no token matches 'gamma'"},
        {"label:2222", "no token matches"},
        {"pkcs11:token=gamma", "no token matches"},
        {"twin", "more than one token matches 'twin'"},
        {"pkcs11:token=twin", "more than one token matches"},
        {"", "more than one token found and none was selected"},
    };
    for (const auto& r : bad) {
        INFO(r.spec);
        try {
            select_token(tokens, r.spec);
            FAIL("selected");
        } catch (const TokenError& e) {
            CHECK_THAT(e.what(), Catch::Contains(r.message));
            // The error lists the tokens that are there, uninitialised ones left out.
            CHECK_THAT(e.hint(), Catch::Contains("label 'alpha', serial 1111"));
            CHECK_THAT(e.hint(), Catch::Contains("label 'twin', serial 4444"));
            CHECK(e.exit_code() == ExitCode::token);
        }
    }
    CHECK_THROWS_AS(select_token(tokens, "pkcs11:token=%ZZ"), UsageError);
    CHECK_THROWS_WITH(select_token(tokens, "pkcs11:token=alpha?pin-value=1234"),
                      Catch::Contains("never takes a PIN from the command line"));

    // With a single initialised token, no spec is needed (never a slot index).
    std::vector<TokenInfo> one = {fake(5, "only", "5555"), fake(6, "", "", false)};
    CHECK(select_token(one, "").slot == 5);
    std::vector<TokenInfo> none = {fake(6, "", "", false)};
    CHECK_THROWS_WITH(select_token(none, ""), Catch::Contains("no initialised token found"));
}

TEST_CASE("PIN flag refusals", "[unit]") {
    struct Row {
        CK_FLAGS flags;
        const char* message;
    };
    const Row rows[] = {
        {CKF_USER_PIN_LOCKED, "CKF_USER_PIN_LOCKED"},
        {CKF_USER_PIN_FINAL_TRY, "CKF_USER_PIN_FINAL_TRY"},
        {CKF_USER_PIN_TO_BE_CHANGED, "CKF_USER_PIN_TO_BE_CHANGED"},
        {CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_COUNT_LOW, "CKF_USER_PIN_FINAL_TRY"},
    };
    for (const auto& r : rows) {
        INFO(r.message);
        try {
            check_login_allowed(r.flags | CKF_TOKEN_INITIALIZED, "tok");
            FAIL("allowed");
        } catch (const TokenError& e) {
            CHECK_THAT(e.what(), Catch::Contains(r.message));
            CHECK_FALSE(e.hint().empty());
            CHECK(e.exit_code() == ExitCode::token);
        }
    }
    CHECK_NOTHROW(check_login_allowed(CKF_TOKEN_INITIALIZED | CKF_USER_PIN_COUNT_LOW |
                                          CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED,
                                      "tok"));
}

TEST_CASE("real tokens: selection by label, serial and URI on SoftHSM", "[token]") {
    kwtest::SoftHsm hsm("softhsm2.conf.in", {"kw-one", "kw-two"});
    auto tokens = list_tokens(*hsm.module());
    auto one = select_token(tokens, "kw-one");
    auto two = select_token(tokens, "label:kw-two");
    CHECK(one.label == "kw-one");
    CHECK(two.label == "kw-two");
    CHECK(one.serial != two.serial);
    CHECK(select_token(tokens, "serial:" + two.serial).slot == two.slot);
    CHECK(select_token(tokens, "pkcs11:token=kw-one;model=SoftHSM%20v2").slot == one.slot);
    CHECK(select_token(tokens, "pkcs11:serial=" + one.serial).slot == one.slot);
    CHECK_THROWS_WITH(select_token(tokens, ""), Catch::Contains("more than one token"));
    try {
        select_token(tokens, "kw-three");
        FAIL("selected");
    } catch (const TokenError& e) {
        CHECK_THAT(e.hint(), Catch::Contains("label 'kw-one', serial " + one.serial));
    }
    // The free slot SoftHSM always offers is listed but never selected.
    CHECK(tokens.size() == 3);
}
