/* ABI version of the native kernel library; the Python loader refuses a library it does not know. */
#define HE_EXPORT __attribute__((visibility("default")))

HE_EXPORT int he_abi_version(void) { return 1; }
