// SPDX-License-Identifier: Apache-2.0
// `keywarden token check`: which key-protection methods really work on a token.
#pragma once

#include <string>
#include <vector>

#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

struct MethodCheck {
    std::string name;       // "aes-key-wrap", "aes-key-wrap-pad", ...
    std::string mechanism;  // "CKM_AES_KEY_WRAP"
    bool listed = false;    // in C_GetMechanismList
    bool works = false;     // the trial round trip succeeded and gave the same key back
    std::string detail;     // why not, in one line
};

struct TokenCheckReport {
    std::vector<MethodCheck> methods;
    std::string chosen;          // the method keywarden would use, or "" if none
    bool chosen_implemented = false;
    std::string chosen_reason;
};

// Tries each method on temporary session objects, destroyed afterwards. Needs a logged-in
// session on most tokens. Trusts C_GetMechanismList and then the operation itself: SoftHSM
// answers C_GetMechanismInfo for mechanisms its config removed (see the notes).
TokenCheckReport check_token(const std::shared_ptr<Session>& s);

}  // namespace keywarden::pkcs11
