package plugin

import (
	"errors"
	"fmt"
	"sync"
	"unicode/utf8"

	"github.com/hwkms/hwkms/plugin/kek"
)

// Keyring holds the primary KEK, which encrypts, and any number of decrypt-only KEKs,
// all selected by key_id. A Keyring is immutable once built; rotation builds a new one
// and swaps it into the Service (see Service.SwapKeyring).
//
// A Keyring is safe for concurrent use. Close waits for requests that acquired the
// keyring (see acquire) to finish before it closes the KEKs, so a reload never fails
// an in-flight request.
type Keyring struct {
	primary kek.KEK
	all     []kek.KEK
	byID    map[string]kek.KEK

	mu     sync.RWMutex // held for reading by each in-flight request
	closed bool
}

// NewKeyring builds a keyring whose first KEK is the primary. Every key_id must be
// valid (non-empty UTF-8, at most kek.MaxKeyIDLen bytes) and unique; a duplicate is an error,
// since kube-apiserver could not tell the keys apart.
func NewKeyring(primary kek.KEK, decryptOnly ...kek.KEK) (*Keyring, error) {
	if primary == nil {
		return nil, errors.New("keyring: a primary key is required")
	}
	all := append([]kek.KEK{primary}, decryptOnly...)
	byID := make(map[string]kek.KEK, len(all))
	for i, k := range all {
		if k == nil {
			return nil, fmt.Errorf("keyring: key %d is nil", i)
		}
		id := k.ID()
		if err := ValidateKeyID(id); err != nil {
			return nil, fmt.Errorf("keyring: key %d: %w", i, err)
		}
		if _, dup := byID[id]; dup {
			return nil, fmt.Errorf("keyring: key %d: duplicate key_id %q", i, id)
		}
		byID[id] = k
	}
	return &Keyring{primary: primary, all: all, byID: byID}, nil
}

// ValidateKeyID checks the kube-apiserver rules for a key_id.
func ValidateKeyID(id string) error {
	switch {
	case id == "":
		return errors.New("key_id is empty")
	case len(id) > kek.MaxKeyIDLen:
		return fmt.Errorf("key_id is %d bytes, more than %d", len(id), kek.MaxKeyIDLen)
	case !utf8.ValidString(id):
		return errors.New("key_id is not valid UTF-8")
	}
	return nil
}

// Primary returns the KEK that encrypts.
func (r *Keyring) Primary() kek.KEK { return r.primary }

// Lookup returns the KEK with the given key_id.
func (r *Keyring) Lookup(keyID string) (kek.KEK, bool) {
	k, ok := r.byID[keyID]
	return k, ok
}

// Keys returns every KEK, primary first.
func (r *Keyring) Keys() []kek.KEK { return append([]kek.KEK(nil), r.all...) }

// acquire marks a request in flight. It returns false if the keyring is already closed;
// otherwise the caller must call release when done with the keyring's KEKs.
func (r *Keyring) acquire() bool {
	// The only writer is Close, which runs after the keyring was swapped out; a failed
	// TryRLock therefore means "closing", and the caller retries with the current keyring
	// instead of waiting for the old one to finish closing.
	if !r.mu.TryRLock() {
		return false
	}
	if r.closed {
		r.mu.RUnlock()
		return false
	}
	return true
}

func (r *Keyring) release() { r.mu.RUnlock() }

// Close waits for in-flight requests to finish, then closes every KEK. Idempotent.
func (r *Keyring) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	var errs []error
	for _, k := range r.all {
		if err := k.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close key %q: %w", k.ID(), err))
		}
	}
	return errors.Join(errs...)
}
