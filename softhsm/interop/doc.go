// Package interop gives tests real PKCS#11 implementations other than the one CI
// always had, so that hwkms can be checked against the tokens operators actually run:
//
//   - StartSoftHSM2: SoftHSM2 (package softhsm2), a fresh token from softhsmtest;
//   - StartOpencryptoki: the opencryptoki soft token (package opencryptoki), slot 3,
//     behind a pkcsslotd the fixture starts;
//   - StartTPM2PKCS11: tpm2-pkcs11 (packages libtpm2-pkcs11-1, libtpm2-pkcs11-tools,
//     tpm2-abrmd, libtss2-tcti-tabrmd0, swtpm) on a swtpm reached through a
//     tpm2-abrmd resource manager on a private D-Bus session bus;
//   - StartNSS: the NSS softoken (libnss3, and libnss3-tools for certutil), whose
//     C_Initialize needs CK_C_INITIALIZE_ARGS.pReserved naming its database.
//
// Each returns a *Token: the module path, the token's label and slot, the user PIN
// (also in a 0600 file), the C_Initialize argument string if the module needs one, and
// the implementation's name and versions (dpkg and C_GetInfo). Every process a
// fixture starts (pkcsslotd; swtpm, dbus-daemon, tpm2-abrmd) listens only on private
// unix sockets, is waited for until it answers (never a fixed sleep) and is stopped by
// its PID in t.Cleanup.
//
// When an implementation's packages are missing the test is skipped with the apt-get
// command that installs them, unless the CI environment variable is set: then it
// fails, so a CI machine without them cannot pass silently (.ci/deps.sh installs them).
//
// # Process-wide and machine-wide state
//
// A PKCS#11 module is initialised once per process, and some read their configuration
// from the environment at C_Initialize:
//
//   - SoftHSM2 reads SOFTHSM2_CONF once per process: a test binary using StartSoftHSM2
//     must call softhsmtest.Main from TestMain, and tokens must be made before the
//     module is first initialised (see softhsmtest).
//
//   - tpm2-pkcs11 reads TPM2_PKCS11_STORE, TPM2_PKCS11_TCTI and
//     DBUS_SESSION_BUS_ADDRESS; StartTPM2PKCS11 sets them with t.Setenv, so its test
//     cannot be parallel and the module must be initialised after the call.
//
//   - opencryptoki's soft token is machine-global: one pkcsslotd per machine
//     (/var/run/pkcsslotd.socket), token files in /var/lib/opencryptoki/swtok and a
//     shared memory file /dev/shm/var.lib.opencryptoki.swtok. StartOpencryptoki holds
//     an exclusive lock (a flock on a file in the temp dir, plus a mutex in the
//     process) from start to cleanup, wipes and re-initialises the token at start and
//     wipes it again at the end. It refuses to start when another pkcsslotd runs, and
//     refuses to wipe a soft token that holds objects and was not made by it (no marker
//     file), so it never destroys an operator's keys; it must run as root.
//
//   - Loading SoftHSM2 (and with it libstdc++) before opencryptoki's first load makes
//     opencryptoki's second C_Initialize in the process crash (docs/tokens.md).
//     Starters lists SoftHSM2 last; a test binary mixing the two must start
//     opencryptoki first.
//
// # Measurements
//
// TestTokens probes each implementation's mechanisms, hwkms's key template, key
// persistence across C_Finalize/C_Initialize, AES-GCM, AES-CBC-PAD and RSA-OAEP, and
// TestHWKMS runs hsm's create, open, wrap and unwrap; both log a markdown table (go
// test -v), and write it to the files named by INTEROP_TABLE and INTEROP_HWKMS_TABLE
// when set. docs/tokens.md holds the tables and the root causes found with them.
//
// This package owns only the fixtures and the measurements of docs/tokens.md; it
// implements no mechanism and is never imported by production code.
package interop
