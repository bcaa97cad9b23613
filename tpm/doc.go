// Package tpm is the TPM 2.0 backend of hwkms: a kek.KEK whose key-encryption key
// is a storage key inside a TPM and never leaves it.
//
// # What this package owns, and what it does not
//
// It owns what runs on a node, against its TPM: the transport (/dev/tpmrm0,
// /dev/tpm0, swtpm over TCP or a unix socket; transport.go, conn.go), the owner
// SRK and the checks of it and of the KEK before anything is salted to them
// (srkpin.go), creating, loading, probing and destroying the KEK (keys.go,
// blobfile.go), sealing and unsealing (seal.go, body.go, fastpath.go), the KEK of
// kind hmac (hmac.go), the reflection-free commands of every Decrypt (fastcmd.go),
// admission control (admission.go), the salted sessions, the
// optional PCR policy (policy.go; volatile PCRs refused, volatile.go), handle hygiene
// (handles.go), the shared connection on a TPM
// without a resource manager (line.go), recovery after the TPM or swtpm restarts,
// and the node side of the multi-node form: exporting the SRK and EK and importing
// an import blob (import.go, ek.go). Its sentinels are in errors.go; Reason,
// Reconnects, CheckDevice and CheckPCRs (for metrics and `hwkms doctor`) in
// diagnostics.go.
//
// It does not own the offline provisioning ceremony: making import blobs, EK
// certificate verification, the import blob format and escrow are package
// tpm/provision, which needs no TPM (ImportKey parses blobs with it). The object
// templates and marshalling both share are tpm/internal/wire. Nor does it own gRPC,
// Kubernetes, the plugin's ciphertext frame, the keyring, metrics or logging (it
// logs nothing), nor the CLI (cmd/hwkms calls CreateKey, Probe, DestroyKey, Open,
// ExportSRK, ExportEK and ImportKey). The swtpm fixture for tests and `hwkms dev`
// is the subpackage tpm/swtpm; tpm/swtpm/latency gives it a discrete TPM's speed for
// tests and `make bench`. Secrets are read and blob files written with
// plugin/files.
//
// Commands follow TPM 2.0 Library Part 3 (Commands); structure names follow Part 2.
// Only go-tpm's tpm2 (direct) API is used.
//
// # The KEK
//
// The KEK is created by TPM2_Create under the owner-hierarchy SRK. The SRK is made
// with TPM2_CreatePrimary from the TCG ECC P-256 SRK template (TCG TPM v2.0
// Provisioning Guidance), so it is re-derived from the owner seed on demand and
// never needs a persistent handle of its own. The KEK's public area is:
//
//	type      TPM_ALG_ECC, curve NIST P-256, scheme NULL, kdf NULL
//	nameAlg   SHA-256
//	symmetric AES-128-CFB (the storage key's protection of its children)
//	attrs     fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt
//	authValue from Config.AuthFile, or empty; authPolicy empty
//
// fixedTPM|fixedParent mean it can never be duplicated off this TPM. (The imported
// form shared by several nodes differs: see "Imported KEK" below.) ECC P-256
// rather than RSA-2048: both are mandatory in the PC Client TPM profile, but ECC key
// generation takes milliseconds where RSA takes up to seconds (the blob form
// re-creates the SRK at every start and reconnect), and salting a session is one
// ECDH instead of an RSA-OAEP decryption.
//
// noDA is set on the KEK and on every sealed object. hwkms authorises thousands of
// operations per restart storm; with dictionary-attack protection any burst of
// authorisation failures (a wrong auth file rolled out, an interposer corrupting
// HMACs) would put the whole TPM into lockout, taking down this cluster's KMS and
// every other DA-protected use of the TPM until the lockout auth or the recovery
// time clears it. Instead the auth value must carry its own entropy: an AuthFile
// must hold MinAuthLen (16) to MaxAuthLen (32) bytes. Without an AuthFile the KEK
// has an empty auth value, and anything that can send commands to the TPM (root, or
// the tss group for /dev/tpmrm0) can use it: the TPM then protects the key from
// leaving the machine, not from local root.
//
// The KEK is kept either at an owner persistent handle (Config.PersistentHandle,
// TPM2_EvictControl; 0x81010000-0x817FFFFF, the SRK range is refused) or in a blob
// file (Config.BlobFile) loaded under the SRK at start. The owner hierarchy's auth
// value must be empty for CreatePrimary and EvictControl. Clearing the owner
// hierarchy (TPM2_Clear) destroys both forms.
//
// # key_id
//
// key_id = "tpm:" + lowercase hex of the KEK's TPM Name, i.e. of
// 0x000b || SHA-256(TPMT_PUBLIC of the KEK): "tpm:000b" followed by 64 hex digits
// (72 bytes). The Name is computed by hwkms from the public area (never taken on
// the TPM's word alone), depends only on the key, is the same on every restart of
// hwkms or of the TPM, and is different for every created key (the public area
// holds the TPM-generated public point). It is pinned at Open (or, with
// Config.KeyID, by the config): if, after a reconnect, the persistent handle holds
// an object with another Name, every call fails with ErrKeyIDMismatch, ErrNotKEK
// and kek.ErrUnavailable. See "What is pinned, and what is not".
//
// # Body format v1 (stored in etcd: never change it, add a version instead)
//
//	offset  size  field
//	0       1     format version, 0x01
//	1       2     P = size of the public area, big-endian uint16
//	3       P     TPMT_PUBLIC of the sealed object (Part 2 section 12.2.4)
//	3+P     2     Q = size of the private area, big-endian uint16
//	5+P     Q     contents of the TPM2B_PRIVATE of the sealed object (Part 2
//	              section 12.3.7): integrity HMAC and AES-128-CFB encrypted
//	              sensitive area, keyed from the KEK's seed
//
// Bytes 1.. are the TPM2B_PUBLIC followed by the TPM2B_PRIVATE exactly as the TPM
// marshals them. Measured on swtpm: a 32-byte seed gives a 241-byte body (273
// with a PCR policy), a 96-byte plaintext 305 (337), well under the 1 KiB limit. Unwrap refuses with kek.ErrInvalidCiphertext, before touching the TPM,
// any body whose version is not 0x01, whose sizes run past the end, that has
// trailing bytes, an empty private area, a public area that does not re-marshal to
// the same bytes, or a public area other than:
//
//	type KEYEDHASH, scheme NULL, nameAlg SHA-256, unique 32 bytes, and either
//	  fixedTPM|fixedParent|noDA|userWithAuth with an empty authPolicy, or
//	  fixedTPM|fixedParent|noDA|adminWithPolicy with a 32-byte authPolicy (PCR mode);
//	never sign, decrypt, restricted or sensitiveDataOrigin.
//
// The TPM then checks, in TPM2_Load, the private area's integrity HMAC over the
// sensitive area and the public area's Name, keyed from the KEK: a tampered public
// or private area, or a body made under another KEK or another TPM, fails with
// TPM_RC_INTEGRITY (or another parameter error) and gives kek.ErrInvalidCiphertext.
//
// The sealed data is SHA-256(aad) || plaintext (33 to 128 bytes: a sealed-data
// object holds at most 128 bytes, hence kek.MaxPlaintext = 96). After TPM2_Unseal
// the digest is compared with SHA-256(aad) in constant time; a mismatch gives
// kek.ErrInvalidCiphertext. The sealed object's auth value is the KEK's (so the
// one session below authorises Load and Unseal); in PCR mode it is empty and only
// the policy authorises Unseal.
//
// # Sessions (two HMAC sessions, not one)
//
// The seed crosses the bus twice: into the TPM in TPM2_Create (inSensitive) and out
// in TPM2_Unseal (outData). Both are protected by AES-128-CFB parameter encryption
// in HMAC sessions salted to the KEK's public key (so only this TPM can derive the
// session key) and authorised with the KEK's auth value, which therefore never
// crosses the bus either. The sessions are started once per connection
// (continueSession) and reused; they are rebuilt after any failure that may have
// desynchronised them and after a reconnect.
//
// One session encrypting in both directions would be simpler. That does not work:
// a TPM refuses a session with the decrypt attribute on a command without an
// encryptable first parameter, and TPM2_Unseal has none (measured on swtpm:
// TPM_RC_ATTRIBUTES), while go-tpm fixes a session's attributes at creation. So
// there are two: one "in" session (decrypt) used for TPM2_Create, one "out"
// session (encrypt) used for TPM2_Load and TPM2_Unseal. The cost is one more
// StartAuthSession per connection and one more session slot (of the three a TPM
// must keep loaded), nothing per request.
//
// In PCR mode Unseal is authorised by a third, policy, session (salted, encrypting
// the response) that is also reused: each Unwrap runs TPM2_PolicyPCR then
// TPM2_Unseal, after which the TPM resets the session's policy digest. It is
// flushed and recreated after any failure.
//
// For a persistent KEK the public key used for salting is read with TPM2_ReadPublic
// at Open, which is not authenticated; Config.KeyID closes that window (next
// section). The blob form takes the public area from the file.
//
// # What is pinned, and what is not (srkpin.go)
//
// A salted session is only as private as the key it is salted to: whoever holds
// that key's private half can derive the session key, decrypt the parameters
// (CreateKey's inSensitive carries the new KEK's auth value) and, with the auth
// value, everything after. Something on the bus between hwkms and the TPM (an
// interposer) could answer TPM2_CreatePrimary or TPM2_ReadPublic with its own key.
// So:
//
//   - The owner SRK, in every TPM2_CreatePrimary answer (CreateKey, ImportKey,
//     Probe, ExportSRK, and Open and every reconnect of the blob form), is checked
//     before a session is salted to it or a key loaded or imported under it: its
//     Name, recomputed from the returned public area, must be the Name the TPM
//     returned; the public area must be the TCG ECC P-256 SRK template (wire.SRKTemplate,
//     every field but the point) with a point on the curve; and with
//     Config.SRKName set, its Name must be that one. Otherwise the call fails with
//     ErrSRKMismatch and kek.ErrUnavailable, and no StartAuthSession, Create, Load
//     or Import follows (TestSubstitutedSRK, with a proxy that substitutes a flipped
//     Name, a duplicable key, and an SRK-template key the TPM made in the NULL
//     hierarchy).
//   - Only the pin catches the last: a well-formed SRK-shaped key the interposer
//     holds the private half of. Without srkName, CreateKey salts to it and the
//     KEK is made under it (the test shows such a blob does not load under the real
//     SRK, but the auth value has been exposed). Take srk_name from `hwkms tpm
//     export-srk` where the bus can be trusted (at provisioning, before the node
//     joins) and put it in srkName; ExportSRK itself is not pinned (it is where the
//     pin comes from). The pin is a Name, not an attestation: hwkms does not check
//     that the SRK belongs to a certified EK when creating a key. The EK-certified
//     path exists only for import blobs (ExportEK, provision.VerifyNodeEK and
//     TPM2_ActivateCredential in ImportKey; see "Imported KEK").
//   - The KEK. Blob form: the public area and Name come from the file, the sessions
//     are salted to that public key, and TPM2_Load under the checked SRK must
//     return the same Name. Persistent form: the public area comes from
//     TPM2_ReadPublic, which no session authenticates. Without Config.KeyID each
//     process trusts the key it finds at its first connect and pins that for its
//     reconnects; with Config.KeyID (the key_id key create printed) Open refuses
//     any other object at the handle before a session is salted to it, with an
//     error naming keyID and both key_ids (ErrKeyIDMismatch, ErrNotKEK), and a
//     reconnect that finds another object fails every call with kek.ErrUnavailable
//     (TestPinnedKeyID). KeyID also pins the blob file, Probe, DestroyKey and the
//     import blob in ImportKey; CreateKey refuses a config with KeyID set.
//   - Not pinned: the persistent form does not re-create the SRK, so srkName is not
//     checked there (keyID is what protects it). Answers that no session HMAC
//     covers (GetCapability, TPM2_PCR_Read at Wrap, the CreatePrimary and
//     ReadPublic answers beyond the checks above) are taken at face value: a lie
//     about PCR values gives a policy the real TPM will not satisfy at Unseal (lost
//     availability, not a leak). An interposer that blocks or corrupts commands can
//     always deny service; these checks keep it from learning the auth value or the
//     seeds.
//
// # KEK of kind hmac and body format v2 (hmac.go; stored in etcd: never change it)
//
// Config.Kind "hmac" (config `tpm.kind: hmac`; the default, and every key made
// before it existed, is kind "sealed" above) is a second kind of KEK, for which each
// Wrap and each Unwrap is one TPM command instead of three (TPM2_Load, TPM2_Unseal,
// TPM2_FlushContext): on a discrete TPM that is the difference between ~70 and
// ~210 Decrypts per second (docs/BENCHMARKS.md). Its public area:
//
//	type      TPM_ALG_KEYEDHASH, scheme HMAC with SHA-256, unique 32 bytes
//	nameAlg   SHA-256
//	attrs     fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|sign
//	authValue from Config.AuthFile, or empty; authPolicy empty
//
// made by CreateKey under the owner SRK like the sealed kind, kept the same two ways
// (persistent handle, or blob file of the same format). It can never be duplicated
// or leave the TPM; key_id is "tpm:" + hex of its Name, as for every KEK. Open
// refuses (ErrNotKEK) a key whose kind is not the configured one, both ways. The
// kind takes no PCR policy, and an imported KEK is always of kind sealed.
//
// Body version 2, for a plaintext of n bytes (1..kek.MaxPlaintext):
//
//	offset  size  field
//	0       1     format version, 0x02
//	1       32    nonce, from crypto/rand, fresh for every Wrap
//	33      n     AES-256-GCM ciphertext of the plaintext under K
//	33+n    16    GCM tag
//
// with K = TPM2_HMAC(KEK, "hwkms-kdf" || 0x00 || 0x02 || nonce || SHA-256(aad)),
// the HMAC-SHA-256 of 75 bytes computed inside the TPM; the GCM nonce is 12 zero
// bytes and the GCM additional data is version || nonce || aad. A 32-byte seed gives
// an 81-byte body. Unwrap refuses with kek.ErrInvalidCiphertext, before the TPM, a
// version other than 0x02 or a size outside 50..145 bytes, and after it any body
// whose tag does not verify: tampered, made by another KEK, or given another aad.
// A KEK of kind sealed refuses version 2 bodies and a KEK of kind hmac version 1
// bodies, as foreign (kek.ErrInvalidCiphertext).
//
// Why this is as strong as the sealed kind:
//
//   - Forging or opening a body needs K, and K is an HMAC under a key that exists
//     only inside the TPM and is used only with the KEK's auth value: as with the
//     sealed kind (whose sealed objects only the TPM's KEK seed can make or read),
//     doing either needs this TPM and the auth value. HMAC-SHA-256 is a PRF, so K
//     of one body says nothing about the K of another.
//   - K is never stored. It exists in hwkms's memory for the duration of one call
//     (cleared after) and crosses the bus only inside TPM2_HMAC's response, which is
//     encrypted (AES-128-CFB) by a salted session keyed with the session key and the
//     KEK's auth value, and authenticated by the session's response HMAC. The seed
//     itself never crosses the bus (with the sealed kind it does, encrypted the same
//     way, both into TPM2_Create and out of TPM2_Unseal).
//   - Each K seals exactly one body: the 256-bit random nonce makes two Wraps
//     share K only with probability 2^-256 per pair (2^-128 after 2^64 bodies), so
//     the fixed GCM nonce is never reused under one key. Integrity is GCM's 128-bit
//     tag under a one-time key (forgery probability 2^-128 per attempt), against the
//     TPM's SHA-256 integrity HMAC and the SHA-256(aad) check of version 1.
//   - Domain separation: the HMAC key serves only this derivation, every input
//     starts with the label and the body version, and the aad (which carries the
//     frame version, backend and key_id) enters as its SHA-256, so the input has a
//     fixed 75-byte length whatever the aad. The aad is bound twice, in K and as GCM
//     additional data.
//
// The session (one: TPM2_HMAC's first parameter needs no encryption in) cannot be
// salted with the KEK, which is not an asymmetric key. It is salted with the owner
// SRK, created at each connect (CreatePrimary) and flushed once the session is
// started (a session keeps its salt). The SRK's public area comes in an
// unauthenticated CreatePrimary response: an active interposer on the bus could
// substitute its own key and learn the session key, but the response encryption is
// also keyed with the KEK's auth value (Part 1 section 21.1), so K then stays as
// secret as that auth value, which must carry MinAuthLen random bytes. (With the
// sealed kind the salt key is the KEK, whose public area comes from the blob file, or
// from TPM2_ReadPublic at Open for a persistent KEK.)
//
// Golden vectors: testdata/golden/hmac-kek.blob, hmac-body-v2.bin and
// hmac-vectors.json (TestGoldenHMAC).
//
// # Connection, concurrency and recovery
//
// On /dev/tpmrm* a KEK owns one connection. Every other device (/dev/tpm0, swtpm)
// accepts one connection at a time, so the KEKs of one process on such a device
// share one (line.go): only one of them, the last used, has its KEK and sessions
// loaded, and a call through another evicts it first (flush, load, two salted
// sessions: about 1.3 ms on swtpm, BenchmarkUnsealSwitch in docs/BENCHMARKS.md). The
// TPM's object and session slots then never hold more than one KEK's state, and a
// config reload or a rotation (several keys on one TPM, a new keyring opened while
// the old one serves) works on them as on /dev/tpmrm0. Either way a KEK serialises
// its commands with a lock (on a shared line, the line's) that callers wait for no
// longer than their ctx allows; each command's socket deadline is the ctx deadline.
// TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING are retried with a backoff from 1
// ms doubling to 20 ms, within the ctx. On any device but /dev/tpmrm* there is no
// resource manager: hwkms assumes it is the TPM's only user and, on every
// (re)connect, flushes every transient object and loaded or saved session
// (GetCapability TPM_CAP_HANDLES), which an earlier process or a broken connection
// may have left. Do not share such a TPM with other software while hwkms runs.
// CreateKey, Probe and DestroyKey do not flush (a serving hwkms may be on the same
// TPM; swtpm then makes them wait until it disconnects).
//
// A transport failure, TPM_RC_INITIALIZE (the TPM was restarted: TPM2_Startup(CLEAR)
// is sent), a missing handle or session, full object or session memory, or a
// response that fails the session HMAC check drops the connection and everything
// loaded; the call is retried once on a new connection (dial, Startup if needed,
// flush leftovers, reload the KEK, restart sessions), within its ctx. While the TPM
// is unreachable every call fails with kek.ErrUnavailable; the first call after
// it returns reconnects, without restarting hwkms. Open itself needs the TPM (the
// key_id is read from it).
//
// Admission (admission.go): before queueing, a call whose deadline cannot be met by
// the calls already queued before it (their number times the mean time of one call,
// observed) is refused at once with ErrWouldMissDeadline and kek.ErrUnavailable
// (gRPC Unavailable), and a call whose turn comes too late to finish is refused
// with context.DeadlineExceeded too, without sending a command: a command cut off by
// its deadline drops the connection, and the reconnect (CreatePrimary, salted
// sessions: ~0.7 s on a discrete TPM) delays every queued call. Config.
// DisableAdmission turns the first refusal off.
//
// Unwrap recognises the one body form Wrap makes without a PCR policy by its bytes
// (fastpath.go) instead of unmarshalling it by reflection; any other body goes the
// general way, which decides the same (TestFastPathAgrees).
//
// The commands of every Decrypt - TPM2_HMAC (kind hmac), TPM2_Load, TPM2_Unseal with
// the auth value, TPM2_FlushContext - are framed by fastcmd.go rather than by go-tpm's
// reflection, which was about two thirds of the client's CPU per TPM2_HMAC, spent
// while the KEK holds the TPM. The session arithmetic (nonces, cpHash and the command
// HMAC, rpHash and the response HMAC compared in constant time, the response
// parameter's AES-CFB) stays go-tpm's, through its exported tpm2.Session methods,
// called in go-tpm's order. Responses are parsed strictly; one flipped bit anywhere
// in a response is an error (TestFastTamperedResponse), and each command agrees with
// go-tpm's on the same session (TestFastCommandsAgree). Wrap's TPM2_Create, the PCR
// policy unseal and the rare commands stay on go-tpm.
//
// When the KEK is live it holds at most: the KEK (transient, blob form only), the
// two HMAC sessions, the policy session (PCR mode, after the first PCR unseal), and
// for the duration of one Unwrap the loaded sealed object. Close flushes all of them.
//
// # PCR policy and recovery
//
// With Config.PCRs, Wrap reads the selected SHA-256 PCRs and seals under
// authPolicy = PolicyPCR(selection, SHA-256 of their current values), userWithAuth
// clear, adminWithPolicy set. Unwrap then succeeds only while those PCRs hold the
// same values. After a firmware update, a boot loader or kernel change measured in
// a selected PCR, or a Secure Boot database change (PCR 7), Unwrap fails with an
// error wrapping ErrPolicy and kek.ErrUnavailable (not ErrInvalidCiphertext: the
// body is authentic). Data sealed before the change is lost to this TPM unless the
// PCRs return to their old values. Recover by planning for it:
//
//   - Before a planned firmware or boot change, rotate (docs/rotation.md) to a new
//     key, or to the same key without pcrs, and migrate storage so that nothing is
//     sealed under the old values; after the change, rotate back to a PCR key.
//   - Or keep a second decrypt key without pcrs (another TPM KEK or a PKCS#11 key) in
//     the keyring and write with it around changes.
//
// Objects sealed without a policy still unwrap when pcrs is added; objects sealed
// with one need the same pcrs list in the config to unwrap (the list is not stored
// in the body; change it only with a new key).
//
// Only PCRs that stay put while the system runs are useful: a PCR that changes after
// Wrap makes everything sealed before the change unreadable. Config.Validate
// therefore refuses these unless Config.AllowVolatilePCRs is set (volatile.go),
// naming the field and the PCR:
//
//	10     IMA: extended at every measured file access (Linux IMA)
//	11     systemd-stub measures the UKI into it, and systemd-pcrphase extends it at
//	       boot milestones while the system runs: enter-initrd, leave-initrd,
//	       sysinit, ready, then shutdown and final (systemd-pcrphase(8))
//	15     systemd-pcrmachine, systemd-pcrfs and systemd-cryptsetup extend the machine
//	       ID, file system identities and volume keys as they come up (same page,
//	       and crypttab(5), tpm2-measure-pcr=)
//	16     debug PCR, resettable from locality 0 (TCG PC Client Platform Firmware
//	       Profile, PCR usage)
//	17-22  DRTM (Intel TXT, AMD SKINIT, Secure Launch): reset and extended by a
//	       dynamic launch, which can happen while the system runs (same profile)
//	23     application support, resettable from locality 0 (same profile)
//
// Stable from one boot to the next until something is updated (same profile):
// 0 firmware code, 1 firmware configuration, 2-3 option ROMs and their
// configuration, 4 boot manager code (and what it loads, e.g. shim, GRUB, the
// kernel under EFI), 5 boot manager configuration and the GPT, 6 platform events, 7
// Secure Boot policy; 8-9 the boot loader (GRUB measures its commands into 8 and
// the files it loads into 9; the kernel measures the initrd into 9); 12-14 systemd-stub
// (kernel command line and credentials in 12, system extensions in 13) and shim
// (MOK lists in 14). Recent systemd also extends a separator into PCR 9 once its
// NV-index PCRs are set up during boot (systemd-pcrnvdone); seal to 9 only if hwkms
// starts after that. PCR 7 with 0 or 4 is the usual choice.
//
// # Imported KEK (several nodes, one KEK; import.go, ek.go, docs/ha.md)
//
// For an HA control plane every node's TPM holds the same KEK, made outside any
// TPM in a provisioning ceremony (package tpm/provision documents the ceremony, the
// import blob format "HWKI" 0x01/0x02, EK binding and escrow). This package does
// the node's part. ExportSRK re-creates the owner SRK and returns its public area,
// which the ceremony encrypts the KEK to; ExportEK adds the TCG-template EK and its
// certificate from NV index 0x01C0000A (ECC) or 0x01C00002 (RSA). ImportKey parses
// the blob with provision.ParseBlob, refuses one whose SRK Name is not this TPM's
// (ErrWrongTPM; a TPM given another TPM's blob anyway fails TPM2_Import with
// TPM_RC_INTEGRITY), for a version 2 blob re-creates the EK, checks its Name
// (ErrWrongTPM) and runs TPM2_ActivateCredential with the SRK (ADMIN role) and the
// EK (USER role, PolicySecret on the endorsement hierarchy, whose auth must be
// empty) to release the key that opens the sealed duplicate, then runs TPM2_Import
// under the SRK and writes the ordinary blob file (or persistent handle), which
// Open loads unchanged. The public area is the same on every node, so is the Name
// and so the key_id; the storage seed is the same, so a sealed object made under
// the KEK on one node loads under it on every other.
//
// Imported KEK public area: the KEK template with attributes
//
//	userWithAuth|noDA|restricted|decrypt  (fixedTPM, fixedParent, sensitiveDataOrigin,
//	                                      adminWithPolicy all clear)
//	authPolicy = SHA-256("hwkms: no policy satisfies this\x00")
//
// fixedTPM is impossible for an object made outside the TPM, and under a fixedTPM
// parent (the SRK) the TPM requires fixedParent == fixedTPM: an imported KEK with
// fixedParent set is refused by TPM2_Import with TPM_RC_ATTRIBUTES (measured on
// swtpm). What keeps it from being duplicated again is the policy: TPM2_Duplicate
// authorises the object in the DUP role, which only a policy session can take,
// and the authPolicy is SHA-256 of a 32-byte string, while every policy digest a
// session can reach is SHA-256 of at least 36 bytes (previous digest or zeros,
// command code, arguments): satisfying it needs a SHA-256 second preimage. A test
// runs TPM2_Duplicate with a policy session (plain and with
// PolicyCommandCode(Duplicate)) and gets TPM_RC_POLICY_FAIL. userWithAuth lets the
// auth value (or nothing, without AuthFile) authorise Create/Load under the KEK as
// before; adminWithPolicy is clear so the ADMIN role (ObjectChangeAuth) also needs
// the auth value, not the policy.
//
// Sealed objects under an imported KEK have fixedTPM clear (a fixedTPM object
// needs a fixedTPM parent) and fixedParent set; Unwrap accepts exactly the shape
// that matches the KEK's form. The KEK check accepts only the two exact KEK shapes
// above; the blob file format is unchanged (version 0x01), the public area says
// which form it is.
//
// # Golden vectors
//
// testdata/golden holds a KEK blob file and bodies (plain, PCR policy, under an
// imported KEK) made on the go-tpm-tools simulator with fixed hierarchy seeds, and
// tpm/provision/testdata/golden the import blobs of both versions and an escrow
// blob for that simulator; TestGolden reads every one back on every run (see
// golden_test.go). A change that cannot read them fails; they are never rewritten
// to fit a change.
//
// # Errors
//
// Every error wraps one of the plugin sentinels and, where the TPM answered, the
// typed tpm2.TPMRC (errors.As/Is work on both): kek.ErrInvalidCiphertext for a
// malformed, tampered or foreign body or a wrong aad; kek.ErrInvalidInput for a
// plaintext outside 1..96 bytes; kek.ErrUnavailable for an unreachable TPM, a
// failed reconnect (also from Open, CreateKey, Probe and DestroyKey), a deadline
// (also wrapping context.DeadlineExceeded), ErrPolicy, ErrSRKMismatch (always),
// and ErrNotKEK, ErrKeyIDMismatch and kek.ErrKeyNotFound after a reconnect;
// kek.ErrClosed after Close. No error carries a seed,
// plaintext or auth value.
//
// # Other deviations and limits
//
//   - Config.BlobFile is the path of one file (version byte 0x01 || TPM2B_PUBLIC ||
//     TPM2B_PRIVATE, the same layout as a body), not a path prefix. CreateKey and
//     ImportKey write it mode 0600 with files.WriteFile (temporary file, fsync,
//     hard link, directory fsync), so it is never partial and never overwritten.
//   - Config.AuthFile is read with files.ReadSecret: a file that other users can
//     read or write is refused (files.ErrInsecureMode).
//   - Open wraps and unwraps a random value before returning, so a wrong auth value
//     (TPM_RC_BAD_AUTH) or an unusable PCR bank fails Open, not the first request.
//   - Auth values with a NUL byte are refused: go-tpm v0.9.8 cuts an HMAC key at any
//     zero byte while the TPM only strips trailing zeros.
//   - go-tpm keeps its own copies of the command and response buffers; hwkms clears
//     its copies of the sealed data but cannot clear those.
//   - The device-file transport (/dev/tpmrm0, /dev/tpm0: one write per command, one
//     read per response, deadlines where the kernel driver supports poll) is not
//     exercised by the tests, which run against swtpm sockets.
package tpm
