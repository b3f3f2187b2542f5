/* ABI version of the native kernel library; the Python loader refuses a library it does not know. */
#include "common.h"

HE_EXPORT int he_abi_version(void) { return 4; }
