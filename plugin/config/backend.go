package config

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
)

// Backend is one configured key on its device: everything the commands and the server
// need of a key without knowing which device holds it. Key.Resolve gives the Backend of
// a configured key; each implementation lives in its own file (backend_pkcs11.go,
// backend_tpm.go) and registers itself with register.
type Backend interface {
	// Name is the backend's config block and label: "pkcs11" or "tpm".
	Name() string
	// Open opens the KEK for serving. The caller closes it.
	Open(ctx context.Context) (kek.KEK, error)
	// Create creates the key on its device; it refuses to overwrite an existing key.
	Create(ctx context.Context) (Created, error)
	// Describe finds the key on its device without opening a KEK (key list, key
	// destroy). A failure is in Description.Err, never a panic.
	Describe(ctx context.Context) Description
	// Is reports whether the configured key is (or, for a selection several keys
	// match, may be) the key with key_id keyID. It fails closed: a device it cannot ask
	// is an error, not a "no". A key that does not exist is not keyID.
	Is(ctx context.Context, keyID string) (bool, error)
	// Rotate creates a new key on the same device as this one and returns the
	// configuration that selects it (key rotate).
	Rotate(ctx context.Context, o RotateOptions) (Created, error)
	// Destroy destroys the key on its device.
	Destroy(ctx context.Context) error
	// Check runs doctor's device checks for this key, reporting each to r.
	Check(ctx context.Context, r Checker, o CheckOptions)
}

// Created describes a key a Backend just created.
type Created struct {
	// KeyID is the new key's key_id.
	KeyID string
	// Where says where the key was created, e.g. `on pkcs11 token: label "x" CKA_ID 01`
	// or "in TPM /dev/tpmrm0: blob file /var/lib/hwkms/kek.blob".
	Where string
	// Key is the configuration that selects exactly the new key.
	Key Key
}

// Description is what key list and key destroy show of a configured key.
type Description struct {
	// KeyID is the key's key_id, "-" when it was not found.
	KeyID string
	// Present is true when exactly one key on the device matches the configuration.
	Present bool
	// Detail is where the key is, or why it was not found (key list's DETAIL column).
	Detail string
	// Where names device and key for a confirmation prompt (key destroy).
	Where string
	// DestroyEffect says what destroying this key does to the data encrypted under it
	// (key destroy's prompt); "" means the data becomes unreadable, forever.
	DestroyEffect string
	// Err is the device's error when the key could not be looked up.
	Err error
}

// RotateOptions selects the new key of Backend.Rotate. Options of other backends are
// ignored.
type RotateOptions struct {
	// Stamp makes default names unique: a UTC timestamp plus a random suffix.
	Stamp string
	// Label is the pkcs11 label of the new key (default hwkms-kek-<Stamp>).
	Label string
	// BlobFile is the tpm blob file of the new key (default kek-<Stamp>.blob beside the
	// current one).
	BlobFile string
	// PersistentHandle is the tpm persistent handle of the new key (required when the
	// current key uses one).
	PersistentHandle string
}

// Checker receives doctor's results, one line per check.
type Checker interface {
	// OK reports a check that passed.
	OK(check, detail string)
	// Warn reports a problem that does not stop serve.
	Warn(check, detail, fix string)
	// Fail reports a problem that stops serve.
	Fail(check, detail, fix string)
	// PINRefused records that a token refused its PIN (doctor then exits 78).
	PINRefused()
}

// CheckOptions tell Backend.Check about its surroundings.
type CheckOptions struct {
	// Name prefixes every check, e.g. "keys[0] (pkcs11, primary)".
	Name string
	// Index is the key's index in keys[].
	Index int
	// ConfigPath is the config file, for the fixes doctor suggests.
	ConfigPath string
	// Timeout bounds each device check.
	Timeout time.Duration
	// SocketServed is true when another process serves the configured socket.
	SocketServed bool
}

// Stats are the device statistics of one open KEK that the metrics export. A Has field
// false means the KEK does not report that statistic.
type Stats struct {
	// HasSessions: Sessions and SessionsInUse are set (PKCS#11 session pool).
	HasSessions bool
	// Sessions is the size of the session pool.
	Sessions int
	// SessionsInUse is the number of sessions held by an operation.
	SessionsInUse int
	// HasReinits: ReinitsOK and ReinitsFailed are set (PKCS#11 module re-initialisations).
	HasReinits bool
	// ReinitsOK counts re-initialisations that succeeded.
	ReinitsOK uint64
	// ReinitsFailed counts re-initialisations that failed.
	ReinitsFailed uint64
	// HasReconnects: Reconnects is set (TPM reconnects).
	HasReconnects bool
	// Reconnects counts re-established TPM connections.
	Reconnects uint64
	// Mechanism is the PKCS#11 mechanism a pkcs11 key wraps with (one of hsm's
	// Mechanism names, chosen at open), "" for other backends.
	Mechanism string
}

// backendType is one entry of the registry: how to find a backend's block in a Key and
// what only that backend knows about its errors and KEKs.
type backendType struct {
	// kind is the frame's backend byte; its String is the config block's name.
	kind kek.Backend
	// of returns the Backend of k's block, or nil when k has no block of this type.
	of func(k Key) Backend
	// validate checks k's block (of(k) != nil), naming fields under prefix.
	validate func(k Key, prefix string) error
	// reason names err as this device reported it: a CKR_ or TPM_RC_ name, or a
	// lowercase class such as "policy"; "" when it has no name for err.
	reason func(err error) string
	// stats adds what k reports of this backend's statistics to s.
	stats func(k kek.KEK, s *Stats)
}

// registry holds every backend, ordered by frame byte.
var registry []backendType

// register adds a backend; each backend file calls it from init.
func register(t backendType) {
	registry = append(registry, t)
	slices.SortFunc(registry, func(a, b backendType) int { return cmp.Compare(a.kind, b.kind) })
}

// Backends returns the names of every backend block, in frame-byte order.
func Backends() []string {
	names := make([]string, len(registry))
	for i, t := range registry {
		names[i] = t.kind.String()
	}
	return names
}

// blocks returns the Backends of every block set in k, with their types. This is the
// one place that looks at which of Key's fields is set.
func (k Key) blocks() ([]Backend, []backendType) {
	var bs []Backend
	var ts []backendType
	for _, t := range registry {
		if b := t.of(k); b != nil {
			bs = append(bs, b)
			ts = append(ts, t)
		}
	}
	return bs, ts
}

// Resolve returns the Backend of k's one backend block.
func (k Key) Resolve() (Backend, error) {
	bs, _ := k.blocks()
	if len(bs) != 1 {
		return nil, fmt.Errorf("exactly one backend block (%s) is required, got %d", strings.Join(Backends(), " or "), len(bs))
	}
	return bs[0], nil
}

// resolved is Resolve without the error: nil when k does not have exactly one block.
func (k Key) resolved() Backend {
	b, _ := k.Resolve()
	return b
}

// Backend returns the name of the key's backend block ("pkcs11" or "tpm"), or "" when
// it does not have exactly one.
func (k Key) Backend() string {
	b, err := k.Resolve()
	if err != nil {
		return ""
	}
	return b.Name()
}

// validateKey checks that k has exactly one backend block and that the block is valid.
func validateKey(k Key, prefix string) []error {
	var errs []error
	bs, ts := k.blocks()
	for _, t := range ts {
		if err := t.validate(k, prefix+"."+t.kind.String()); err != nil {
			errs = append(errs, err)
		}
	}
	if len(bs) != 1 {
		errs = append(errs, fmt.Errorf("%s: exactly one backend block (%s) is required, got %d", prefix, strings.Join(Backends(), " or "), len(bs)))
	}
	return errs
}

// DeviceReason names err as the device of backend b reported it: a CK_RV name
// ("CKR_DEVICE_REMOVED"), a TPM_RC name ("TPM_RC_INITIALIZE") or a backend class
// ("policy"); "" when the backend has no name for it. metrics.DeviceReason bounds it
// and adds the classes every backend shares.
func DeviceReason(b kek.Backend, err error) string {
	if err == nil {
		return ""
	}
	for _, t := range registry {
		if t.kind == b && t.reason != nil {
			return t.reason(err)
		}
	}
	return ""
}

// DeviceStats returns the device statistics k reports (session pool,
// re-initialisations, reconnects). It never touches the device.
func DeviceStats(k kek.KEK) Stats {
	var s Stats
	for _, t := range registry {
		if t.stats != nil {
			t.stats(k, &s)
		}
	}
	return s
}

// roundTrip is doctor's last check of every backend: one wrap+unwrap on the open KEK.
func roundTrip(ctx context.Context, r Checker, name string, k kek.KEK) {
	start := time.Now()
	h := plugin.Probe(ctx, k)
	if !h.OK {
		r.Fail(name+" round trip", h.Reason+": "+h.Err.Error(), "")
		return
	}
	r.OK(name+" round trip", fmt.Sprintf("wrap+unwrap of 32 bytes in %s", time.Since(start).Round(10*time.Microsecond)))
}

// errNoBackend is OpenKey's error for a key without exactly one backend block.
var errNoBackend = errors.New("no backend block")
