package hsm

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hwkms/hwkms/plugin/files"
	"github.com/miekg/pkcs11"
)

// Session pool bounds for Config.Sessions.
const (
	// DefaultSessions is the session pool size used when Config.Sessions is 0.
	DefaultSessions = 4
	// MaxSessions is the largest accepted Config.Sessions.
	MaxSessions = 64
)

// maxPINFileSize bounds how much of a PIN file is read; PKCS#11 PINs are short.
const maxPINFileSize = 4096

// Config is one key's PKCS#11 settings; the JSON tags are the YAML config field names.
//
// The token is chosen by exactly one of TokenLabel, TokenSerial or Slot, and the user
// PIN comes from exactly one of PINFile or PINEnv (never from the command line). The key
// is the AES secret key whose CKA_LABEL is KeyLabel and, if KeyCKAID is set, whose CKA_ID
// is the hex-decoded KeyCKAID. URI may name module, token, key and PIN file instead
// (uri.go).
type Config struct {
	// Module is the absolute path of the PKCS#11 module (.so).
	Module string `json:"module"`
	// TokenLabel selects the token by its label (CK_TOKEN_INFO.label, trailing blanks ignored).
	TokenLabel string `json:"tokenLabel,omitempty"`
	// TokenSerial selects the token by its serial number (CK_TOKEN_INFO.serialNumber).
	TokenSerial string `json:"tokenSerial,omitempty"`
	// Slot selects the token by its slot ID.
	Slot *uint `json:"slot,omitempty"`
	// PINFile is the path of a file holding the user PIN; one trailing newline is removed.
	PINFile string `json:"pinFile,omitempty"`
	// PINEnv is the name of an environment variable holding the user PIN.
	PINEnv string `json:"pinEnv,omitempty"`
	// KeyLabel is the CKA_LABEL of the KEK.
	KeyLabel string `json:"keyLabel"`
	// KeyCKAID is an optional hex CKA_ID that disambiguates keys sharing KeyLabel.
	KeyCKAID string `json:"keyCKAID,omitempty"`
	// Sessions is the session pool size: 0 means DefaultSessions, at most MaxSessions.
	Sessions int `json:"sessions,omitempty"`
	// AllowExtractable accepts a key whose attributes would let it leave the token
	// (CKA_EXTRACTABLE true, CKA_SENSITIVE false or CKA_NEVER_EXTRACTABLE false).
	// Default false: such keys are refused.
	AllowExtractable bool `json:"allowExtractable,omitempty"`
	// AllowReplicated accepts, more narrowly than AllowExtractable, a KEK copied
	// between tokens by ReplicateKey (replicate.go): a sensitive, non-extractable
	// copy whose CKA_NEVER_EXTRACTABLE is false, or a replicable source key with
	// CKA_WRAP_WITH_TRUSTED. Default false.
	AllowReplicated bool `json:"allowReplicated,omitempty"`
	// URI names module, token, key and PIN file as an RFC 7512 pkcs11: URI instead
	// of the separate fields (uri.go); a field the URI sets must not be set too.
	URI string `json:"uri,omitempty"`
	// InitArgs is passed to C_Initialize as CK_C_INITIALIZE_ARGS.pReserved, for a
	// module that needs it (the NSS softoken: its database); not secret (initargs.go).
	InitArgs string `json:"initArgs,omitempty"`
	// Mechanism is how the key wraps (doc.go, "Mechanisms"): MechanismAuto ("auto",
	// also when empty), MechanismAESGCM, MechanismAESGCMTokenIV, MechanismAESCBCHMAC or
	// MechanismRSAOAEP (opt-in only: auto never picks it).
	// auto picks, at Open and at CreateKey, the first of aes-gcm, aes-gcm-token-iv
	// and aes-cbc-hmac that the token offers (C_GetMechanismInfo) and that passes a
	// wrap/unwrap round trip. Every body records its own mechanism, so a change of
	// this field never makes stored bodies unreadable.
	Mechanism string `json:"mechanism,omitempty"`
	// GCMMechanism is the CK_MECHANISM_TYPE used by aes-gcm-token-iv instead of
	// CKM_AES_GCM, for a token that offers only a vendor-defined GCM mechanism. It
	// must be CKM_VENDOR_DEFINED (0x80000000) or above and fit in 32 bits; 0 means
	// CKM_AES_GCM. Bodies record the mechanism number they were made with, and Unwrap
	// accepts only CKM_AES_GCM or this value.
	GCMMechanism uint `json:"gcmMechanism,omitempty"`
}

// Validate checks c without touching the module or the PIN source. Every error names the
// offending field under prefix: Validate("keys[0].pkcs11") reports
// "keys[0].pkcs11.tokenLabel: ...". All problems are reported, joined with errors.Join.
func (c Config) Validate(prefix string) error {
	field := func(name string) string {
		if prefix == "" {
			return name
		}
		return prefix + "." + name
	}
	var errs []error
	bad := func(name, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field(name), fmt.Sprintf(format, args...)))
	}
	c = c.validateURI(bad)
	c.validateInitArgs(bad)

	switch {
	case c.Module == "":
		bad("module", "required: the path of the PKCS#11 module")
	case !filepath.IsAbs(c.Module):
		bad("module", "must be an absolute path (a bare name would be looked up in the library search path)")
	}

	var selectors []string
	if c.TokenLabel != "" {
		selectors = append(selectors, "tokenLabel")
	}
	if c.TokenSerial != "" {
		selectors = append(selectors, "tokenSerial")
	}
	if c.Slot != nil {
		selectors = append(selectors, "slot")
	}
	switch len(selectors) {
	case 0:
		bad("tokenLabel", "exactly one of tokenLabel, tokenSerial or slot is required; none is set")
	case 1:
	default:
		bad(selectors[1], "exactly one of tokenLabel, tokenSerial or slot may be set; %s are set", strings.Join(selectors, " and "))
	}
	if len(c.TokenLabel) > 32 {
		bad("tokenLabel", "longer than 32 bytes, the PKCS#11 token label size")
	}
	if len(c.TokenSerial) > 16 {
		bad("tokenSerial", "longer than 16 bytes, the PKCS#11 serial number size")
	}

	switch {
	case c.PINFile == "" && c.PINEnv == "":
		bad("pinFile", "exactly one of pinFile or pinEnv is required; none is set")
	case c.PINFile != "" && c.PINEnv != "":
		bad("pinEnv", "exactly one of pinFile or pinEnv may be set; both are set")
	}
	if c.PINEnv != "" && strings.ContainsAny(c.PINEnv, "=\x00") {
		bad("pinEnv", "is not a valid environment variable name")
	}

	switch {
	case c.KeyLabel == "":
		bad("keyLabel", "required: the CKA_LABEL of the key")
	case strings.IndexByte(c.KeyLabel, 0) >= 0:
		bad("keyLabel", "must not contain a NUL byte (it separates fields in the key_id derivation)")
	}
	if c.KeyCKAID != "" {
		if _, err := hex.DecodeString(c.KeyCKAID); err != nil {
			bad("keyCKAID", "not an even-length hex string")
		}
	}
	switch c.Mechanism {
	case "", MechanismAuto, MechanismAESGCM, MechanismAESGCMTokenIV, MechanismAESCBCHMAC, MechanismRSAOAEP:
	default:
		bad("mechanism", "must be one of %s, got %q", strings.Join(mechanismNames, ", "), c.Mechanism)
	}
	if c.GCMMechanism != 0 {
		switch {
		case c.GCMMechanism < pkcs11.CKM_VENDOR_DEFINED || c.GCMMechanism > 0xffffffff:
			bad("gcmMechanism", "must be a vendor-defined mechanism number (0x80000000..0xffffffff), got 0x%x", c.GCMMechanism)
		case c.Mechanism != MechanismAESGCMTokenIV:
			bad("gcmMechanism", "applies only to mechanism %q", MechanismAESGCMTokenIV)
		}
	}
	if c.Sessions < 0 || c.Sessions > MaxSessions {
		bad("sessions", "must be between 1 and %d (0 means %d), got %d", MaxSessions, DefaultSessions, c.Sessions)
	}
	return errors.Join(errs...)
}

// sessions returns the effective pool size.
func (c Config) sessions() int {
	if c.Sessions == 0 {
		return DefaultSessions
	}
	return c.Sessions
}

// ckaID returns the decoded KeyCKAID, nil if unset. Call only after Validate.
func (c Config) ckaID() []byte {
	if c.KeyCKAID == "" {
		return nil
	}
	id, _ := hex.DecodeString(c.KeyCKAID)
	return id
}

// tokenName describes the token selector for error messages; it is never secret.
func (c Config) tokenName() string {
	switch {
	case c.TokenLabel != "":
		return fmt.Sprintf("token labelled %q", c.TokenLabel)
	case c.TokenSerial != "":
		return fmt.Sprintf("token with serial %q", c.TokenSerial)
	case c.Slot != nil:
		return fmt.Sprintf("token in slot %d", *c.Slot)
	}
	return "token"
}

// readPIN reads the user PIN from PINFile (one trailing "\n" or "\r\n" removed) or from
// the PINEnv variable. Errors name the source but never quote its content.
func (c Config) readPIN() (string, error) {
	pin, err := c.readPINSource()
	return pin, mark(err, ErrPINSource)
}

func (c Config) readPINSource() (string, error) {
	var pin string
	switch {
	case c.PINFile != "":
		// One trailing newline is removed; a PIN file others can read is refused.
		b, err := files.ReadSecret(c.PINFile, files.SecretOptions{MaxBytes: maxPINFileSize})
		if errors.Is(err, files.ErrTooLarge) {
			return "", fmt.Errorf("hsm: pinFile %q: larger than %d bytes", c.PINFile, maxPINFileSize)
		}
		if err != nil {
			return "", fmt.Errorf("hsm: pinFile: %w", err)
		}
		pin = string(b)
		clear(b)
		if pin == "" {
			return "", fmt.Errorf("hsm: pinFile %q: PIN is empty", c.PINFile)
		}
	case c.PINEnv != "":
		pin = os.Getenv(c.PINEnv)
		if pin == "" {
			return "", fmt.Errorf("hsm: pinEnv: environment variable %q is unset or empty", c.PINEnv)
		}
	default:
		return "", errors.New("hsm: no PIN source configured (pinFile or pinEnv)")
	}
	return pin, nil
}
