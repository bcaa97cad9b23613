package tpm

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// DefaultDevice is the TPM used when Config.Device is empty: the kernel's resource
// manager, which isolates hwkms's handles and sessions from other TPM users.
const DefaultDevice = "/dev/tpmrm0"

// Persistent handle ranges (TCG "Registry of Reserved TPM 2.0 Handles and Localities").
const (
	ownerPersistentFirst = 0x81000000 // first owner-hierarchy persistent handle
	ownerPersistentLast  = 0x817FFFFF // last owner-hierarchy persistent handle
	srkRangeLast         = 0x8100FFFF // 0x81000000-0x8100FFFF are reserved for SRKs
)

// Limits on the KEK auth value read from Config.AuthFile.
const (
	// MinAuthLen is the shortest accepted auth value. The KEK and sealed objects are
	// created with noDA (see doc.go), so the TPM does not rate-limit guesses: the auth
	// value must carry its own entropy.
	MinAuthLen = wire.MinAuthLen
	// MaxAuthLen is the longest accepted auth value: the TPM limits an object's
	// authValue to the digest size of its nameAlg (SHA-256).
	MaxAuthLen = wire.MaxAuthLen
)

// MaxPCRs is the largest number of PCRs a policy may select: TPM2_PCR_Read returns
// at most 8 digests per call (TPML_DIGEST).
const MaxPCRs = 8

// Config selects a TPM and a KEK on it. The zero Device means DefaultDevice.
// Exactly one of PersistentHandle and BlobFile is set.
type Config struct {
	// Device is "/dev/tpmrm0" (default), "/dev/tpm0" (or another absolute device path),
	// "tcp://host:port" (swtpm's server port) or "unix:///path/to/swtpm.sock".
	// Only a /dev/tpmrm* device has a resource manager; on any other transport hwkms
	// assumes it is the TPM's only user (see doc.go).
	Device string `json:"device,omitempty"`
	// PersistentHandle is the KEK's owner-hierarchy persistent handle, e.g.
	// "0x81010010", in 0x81010000-0x817FFFFF (the SRK range 0x81000000-0x8100FFFF is
	// refused so a KEK can never be confused with, or destroyed as, a system SRK).
	PersistentHandle string `json:"persistentHandle,omitempty"`
	// BlobFile is the path of a file holding the KEK's public and private areas
	// (format in doc.go). The KEK is loaded under the owner SRK at start.
	BlobFile string `json:"blobFile,omitempty"`
	// AuthFile optionally names a file holding the KEK's auth value (MinAuthLen to
	// MaxAuthLen bytes, no NUL byte; one trailing "\n" or "\r\n" is removed). The file must not be
	// accessible to other users (no "other" permission bits).
	AuthFile string `json:"authFile,omitempty"`
	// PCRs, when set, seals every new object under a PolicyPCR over these SHA-256
	// PCRs (0-23, at most MaxPCRs) with their values at Wrap time. See doc.go for
	// what a PCR change does and how to recover.
	PCRs []int `json:"pcrs,omitempty"`
	// AllowVolatilePCRs lets PCRs select PCRs that change while the system runs (10,
	// 11, 15, 16-23; see doc.go), which are otherwise refused: data sealed to one
	// becomes unreadable at its next change.
	AllowVolatilePCRs bool `json:"allowVolatilePCRs,omitempty"`
	// SRKName optionally pins the owner SRK: the srk_name `hwkms tpm export-srk`
	// prints (hex, "000b" followed by 64 hex digits). CreateKey, ImportKey, Probe
	// and the blob form of Open then refuse (ErrSRKMismatch) an SRK with another
	// Name before any session is salted to it or any key loaded under it.
	SRKName string `json:"srkName,omitempty"`
	// KeyID optionally pins the KEK: its key_id ("tpm:000b" followed by 64 hex
	// digits, as key create prints it). Open, Probe, DestroyKey and ImportKey refuse
	// (ErrKeyIDMismatch) a KEK with another key_id at the persistent handle or in
	// the blob file, before any session is salted to it. CreateKey refuses a config
	// with KeyID set: a new key cannot have a given key_id.
	KeyID string `json:"keyID,omitempty"`
	// DisableAdmission turns off the refusal at once (gRPC Unavailable) of a call that
	// the calls queued before it on the TPM would keep from finishing before its
	// deadline (see admission.go); such a call then waits and fails at its deadline.
	// On a shared line the last KEK opened decides for all of them.
	DisableAdmission bool `json:"disableAdmission,omitempty"`
	// Kind is the kind of a KEK CreateKey makes and Open expects: "sealed" (the
	// default, also when empty: an ECC storage key under which each seed is a sealed
	// object, body version 1) or "hmac" (a keyed-hash key from which each body's
	// one-time AES-256-GCM key is derived with one TPM2_HMAC, body version 2). See
	// doc.go. A KEK's kind never changes; the kind hmac takes no PCRs.
	Kind string `json:"kind,omitempty"`
}

// KEK kinds (Config.Kind).
const (
	KindSealed = "sealed"
	KindHMAC   = "hmac"
)

// Validate checks the configuration without touching the TPM or the file system.
// Every error names its field under prefix, e.g. "keys[0].tpm.device: ...".
func (c Config) Validate(prefix string) error {
	field := func(name string) string {
		if prefix == "" {
			return name
		}
		return prefix + "." + name
	}
	var errs []error
	if _, err := parseDevice(c.Device); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", field("device"), err))
	}
	switch {
	case c.PersistentHandle == "" && c.BlobFile == "":
		errs = append(errs, fmt.Errorf("%s: exactly one of persistentHandle and blobFile is required, neither is set", field("persistentHandle")))
	case c.PersistentHandle != "" && c.BlobFile != "":
		errs = append(errs, fmt.Errorf("%s: exactly one of persistentHandle and blobFile is allowed, both are set", field("persistentHandle")))
	case c.PersistentHandle != "":
		if _, err := parseHandle(c.PersistentHandle); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", field("persistentHandle"), err))
		}
	default:
		if strings.ContainsRune(c.BlobFile, 0) || strings.HasSuffix(c.BlobFile, "/") {
			errs = append(errs, fmt.Errorf("%s: %q is not a file path", field("blobFile"), c.BlobFile))
		}
	}
	if strings.ContainsRune(c.AuthFile, 0) {
		errs = append(errs, fmt.Errorf("%s: not a file path", field("authFile")))
	}
	if _, err := pcrList(c.PCRs); err != nil {
		errs = append(errs, fmt.Errorf("%s: %w", field("pcrs"), err))
	} else if !c.AllowVolatilePCRs {
		if err := checkVolatilePCRs(c.PCRs, field("allowVolatilePCRs")); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", field("pcrs"), err))
		}
	}
	if c.SRKName != "" {
		if _, err := parseName(c.SRKName, "the srk_name hwkms tpm export-srk prints"); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", field("srkName"), err))
		}
	}
	if c.KeyID != "" {
		if _, err := parseKeyID(c.KeyID); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", field("keyID"), err))
		}
	}
	switch c.Kind {
	case "", KindSealed:
	case KindHMAC:
		if len(c.PCRs) > 0 {
			errs = append(errs, fmt.Errorf("%s: a KEK of kind %q takes no PCRs (use kind %q for a PCR policy)", field("pcrs"), KindHMAC, KindSealed))
		}
	default:
		errs = append(errs, fmt.Errorf("%s: %q: want %q (default) or %q", field("kind"), c.Kind, KindSealed, KindHMAC))
	}
	return errors.Join(errs...)
}

// device is a parsed Config.Device.
type device struct {
	network string // "file", "tcp" or "unix"
	address string // device path, host:port or socket path
	rm      bool   // a resource manager isolates our handles (only /dev/tpmrm*)
}

func (d device) String() string {
	switch d.network {
	case "file":
		return d.address
	default:
		return d.network + "://" + d.address
	}
}

func parseDevice(s string) (device, error) {
	if s == "" {
		s = DefaultDevice
	}
	switch {
	case strings.HasPrefix(s, "tcp://"):
		addr := strings.TrimPrefix(s, "tcp://")
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host == "" {
			return device{}, fmt.Errorf("%q: want tcp://host:port", s)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return device{}, fmt.Errorf("%q: port must be 1-65535", s)
		}
		return device{network: "tcp", address: addr}, nil
	case strings.HasPrefix(s, "unix://"):
		path := strings.TrimPrefix(s, "unix://")
		if !filepath.IsAbs(path) {
			return device{}, fmt.Errorf("%q: want unix:///absolute/path", s)
		}
		return device{network: "unix", address: path}, nil
	case strings.Contains(s, "://"):
		return device{}, fmt.Errorf("%q: unknown scheme (want a /dev path, tcp:// or unix://)", s)
	case filepath.IsAbs(s) && !strings.ContainsRune(s, 0):
		return device{network: "file", address: s, rm: strings.HasPrefix(filepath.Base(s), "tpmrm")}, nil
	default:
		return device{}, fmt.Errorf("%q: want an absolute device path such as %s, tcp://host:port or unix:///path", s, DefaultDevice)
	}
}

func parseHandle(s string) (tpm2.TPMHandle, error) {
	if !strings.HasPrefix(s, "0x") && !strings.HasPrefix(s, "0X") {
		return 0, fmt.Errorf("%q: want a hex handle such as 0x81010010", s)
	}
	v, err := strconv.ParseUint(s[2:], 16, 32)
	if err != nil {
		return 0, fmt.Errorf("%q: want a hex handle such as 0x81010010", s)
	}
	if v < ownerPersistentFirst || v > ownerPersistentLast {
		return 0, fmt.Errorf("%s is not an owner persistent handle (0x81000000-0x817FFFFF)", s)
	}
	if v <= srkRangeLast {
		return 0, fmt.Errorf("%s is in the SRK range 0x81000000-0x8100FFFF; use 0x81010000-0x817FFFFF", s)
	}
	return tpm2.TPMHandle(v), nil
}

// pcrList returns the PCRs sorted, or an error for out-of-range or repeated entries.
func pcrList(pcrs []int) ([]uint, error) {
	if len(pcrs) > MaxPCRs {
		return nil, fmt.Errorf("%d PCRs selected, at most %d", len(pcrs), MaxPCRs)
	}
	out := make([]uint, 0, len(pcrs))
	for _, p := range pcrs {
		if p < 0 || p > 23 {
			return nil, fmt.Errorf("PCR %d out of range 0-23", p)
		}
		if slices.Contains(out, uint(p)) {
			return nil, fmt.Errorf("PCR %d listed twice", p)
		}
		out = append(out, uint(p))
	}
	slices.Sort(out)
	return out, nil
}

// readAuth reads the auth value from path ("" means no auth value) with
// files.ReadSecret: a regular file no other user can access, one trailing "\n" or
// "\r\n" removed, at most MaxAuthLen bytes. It must hold at least MinAuthLen bytes
// and no NUL. The value never appears in an error.
func readAuth(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := files.ReadSecret(path, files.SecretOptions{MaxBytes: MaxAuthLen})
	if errors.Is(err, files.ErrTooLarge) {
		return nil, fmt.Errorf("tpm: authFile %s: auth value has more than %d bytes, want at most %d", path, MaxAuthLen, MaxAuthLen)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: read authFile: %w", err)
	}
	switch {
	case len(b) < MinAuthLen:
		clear(b)
		return nil, fmt.Errorf("tpm: authFile %s: auth value has %d bytes, want at least %d", path, len(b), MinAuthLen)
	case bytes.IndexByte(b, 0) >= 0:
		clear(b)
		return nil, fmt.Errorf("tpm: authFile %s: auth value contains a NUL byte", path)
	}
	return b, nil
}
