// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "keywarden/pkcs11.hpp"

using namespace keywarden;
using namespace keywarden::pkcs11;

TEST_CASE("PKCS#11 errors read like 'C_Login: CKR_PIN_INCORRECT (0xA0): ...'", "[unit]") {
    Pkcs11Error e("C_Login", CKR_PIN_INCORRECT);
    CHECK(std::string(e.what()) == "C_Login: CKR_PIN_INCORRECT (0xA0): the PIN is incorrect");
    CHECK(e.hint().find("never retries") != std::string::npos);
    CHECK(e.exit_code() == ExitCode::token);
    CHECK(e.rv() == CKR_PIN_INCORRECT);
    CHECK(e.function() == "C_Login");
}

TEST_CASE("return-code table", "[unit]") {
    struct Row {
        CK_RV rv;
        const char* name;
    };
    const Row rows[] = {
        {CKR_OK, "CKR_OK"},
        {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
        {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
        {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
        {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
        {CKR_SIGNATURE_INVALID, "CKR_SIGNATURE_INVALID"},
        {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
        {CKR_WRAPPED_KEY_INVALID, "CKR_WRAPPED_KEY_INVALID"},
        {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    };
    for (const auto& r : rows) {
        INFO(r.name);
        CHECK(rv_name(r.rv) == r.name);
        CHECK_FALSE(rv_description(r.rv).empty());
    }
    CHECK(rv_name(0x12345678UL) == "CKR_0x12345678");
    CHECK(rv_description(CKR_VENDOR_DEFINED | 5) == "vendor-defined error");
    Pkcs11Error unknown("C_Foo", 0x777UL);
    CHECK(std::string(unknown.what()) == "C_Foo: CKR_0x777 (0x777): unknown error");
}

TEST_CASE("the choke point throws with the function name and records the call", "[unit]") {
    clear_call_trace();
    auto fails = [](CK_ULONG) -> CK_RV { return CKR_DEVICE_REMOVED; };
    auto works = [](CK_ULONG) -> CK_RV { return CKR_OK; };
    CHECK_NOTHROW(call("C_Works", +works, 1UL));
    try {
        call("C_Fails", +fails, 1UL);
        FAIL("no exception");
    } catch (const Pkcs11Error& e) {
        CHECK(std::string(e.what()).starts_with("C_Fails: CKR_DEVICE_REMOVED (0x32)"));
        CHECK(e.hint() == "insert the token and try again");
    }
    auto trace = call_trace();
    REQUIRE(trace.size() == 2);
    CHECK(trace[0] == "C_Works -> CKR_OK");
    CHECK(trace[1] == "C_Fails -> CKR_DEVICE_REMOVED");
    CHECK(try_call("C_Fails", +fails, 2UL) == CKR_DEVICE_REMOVED);
}

TEST_CASE("the call trace keeps the last 200 calls, oldest first", "[unit]") {
    clear_call_trace();
    CHECK(call_trace().empty());
    static const char* const kNames[] = {"C_A", "C_B", "C_C"};
    for (std::size_t i = 0; i < 250; ++i) record_call(kNames[i % 3], i == 249 ? CKR_PIN_INCORRECT : CKR_OK);
    auto trace = call_trace();
    REQUIRE(trace.size() == 200);
    CHECK(trace.front() == "C_C -> CKR_OK");  // call 50 (50 % 3 == 2): calls 0 to 49 fell out
    CHECK(trace[1] == "C_A -> CKR_OK");
    CHECK(trace.back() == "C_A -> CKR_PIN_INCORRECT");  // call 249
    clear_call_trace();
    record_call("C_Z", CKR_OK);
    REQUIRE(call_trace().size() == 1);
    CHECK(call_trace()[0] == "C_Z -> CKR_OK");
}

TEST_CASE("mechanism and flag names", "[unit]") {
    CHECK(mechanism_name(CKM_AES_KEY_WRAP_PAD) == "CKM_AES_KEY_WRAP_PAD");
    CHECK(mechanism_name(CKM_AES_KEY_WRAP_KWP) == "CKM_AES_KEY_WRAP_KWP");
    CHECK(mechanism_name(0x80001234UL) == "CKM_0x80001234");
    auto f = token_flag_names(CKF_RNG | CKF_USER_PIN_FINAL_TRY);
    REQUIRE(f.size() == 2);
    CHECK(f[0] == "RNG");
    CHECK(f[1] == "USER_PIN_FINAL_TRY");
}
