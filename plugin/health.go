package plugin

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
)

// Health is the result of one probe of the primary KEK.
type Health struct {
	// OK is true when the probe's wrap+unwrap round trip succeeded.
	OK bool
	// Reason is "ok" when OK, else a short description safe to show (no key material).
	Reason string
	// KeyID is the key_id of the primary KEK that was probed.
	KeyID string
	// At is when the probe finished.
	At time.Time
	// Err is the probe's error, for logs; nil when OK.
	Err error
}

// Probe runs one real round trip on k: it wraps 32 fresh random bytes and unwraps them,
// exactly as Encrypt and Decrypt would, and checks the result. It touches the device.
func Probe(ctx context.Context, k kek.KEK) Health {
	h := Health{KeyID: k.ID()}
	err := probe(ctx, k)
	h.At = time.Now()
	if err != nil {
		h.Err = err
		h.Reason = "probe of key_id " + k.ID() + " failed: " + reasonOf(err)
		return h
	}
	h.OK, h.Reason = true, "ok"
	return h
}

func probe(ctx context.Context, k kek.KEK) error {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return fmt.Errorf("read random seed: %w", err)
	}
	aad := frameAAD(k.Backend(), k.ID())
	body, err := k.Wrap(ctx, seed, aad)
	if err != nil {
		return fmt.Errorf("wrap: %w", err)
	}
	if len(body)+frameHeaderLen > kek.MaxCiphertext {
		return fmt.Errorf("wrap produced a %d-byte frame, over the %d-byte limit", len(body)+frameHeaderLen, kek.MaxCiphertext)
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil {
		return fmt.Errorf("unwrap: %w", err)
	}
	if !bytes.Equal(got, seed) {
		return errors.New("unwrap returned different bytes than were wrapped")
	}
	return nil
}

// reasonOf gives a short, non-secret category for an error.
func reasonOf(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "device did not answer in time"
	case errors.Is(err, kek.ErrClosed):
		return "key is closed"
	case errors.Is(err, kek.ErrUnavailable):
		return "device unavailable"
	case errors.Is(err, kek.ErrInvalidCiphertext):
		return "round trip failed authentication"
	default:
		return "device error"
	}
}

// healthCache holds the latest probe result. Status reads it and never touches the
// device; a background loop (Service.Run) refreshes it.
type healthCache struct {
	mu   sync.RWMutex
	last Health
}

func (c *healthCache) get() Health {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.last
}

func (c *healthCache) set(h Health) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.last = h
}
