package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin"
)

// session is one slot of the pool. A slot may be empty (open false) after its session
// was dropped; acquire opens a fresh one.
type session struct {
	h      pkcs11.SessionHandle
	open   bool
	broken bool // set by the user: close it on release
}

// pool is a fixed number of read-only sessions on one token, each used by one
// goroutine at a time (PKCS#11 sessions are not safe for concurrent operations).
type pool struct {
	tok   *token
	slots chan *session
	done  <-chan struct{} // closed when the KEK closes; wakes waiters

	onWait func() // test hook: called before blocking for a session; nil in production
}

// newPool opens n sessions eagerly, so that a token that cannot give us n sessions
// fails at Open rather than under load.
func newPool(tok *token, n int, done <-chan struct{}) (*pool, error) {
	p := &pool{tok: tok, slots: make(chan *session, n), done: done}
	for range n {
		s := &session{}
		if err := p.open(s); err != nil {
			p.slots <- s
			p.closeAll()
			return nil, err
		}
		p.slots <- s
	}
	return p, nil
}

func (p *pool) open(s *session) error {
	h, err := p.tok.ctx.OpenSession(p.tok.slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return fmt.Errorf("hsm: C_OpenSession on token %q: %w: %w", p.tok.label, plugin.ErrUnavailable, err)
	}
	s.h, s.open, s.broken = h, true, false
	return nil
}

// acquire takes a session from the pool, waiting at most until ctx is done or the KEK
// closes, and opens a fresh session in an empty slot. Pair it with a deferred release.
func (p *pool) acquire(ctx context.Context) (*session, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("hsm: waiting for a session on token %q: %w", p.tok.label, err)
	}
	var s *session
	select {
	case s = <-p.slots:
	default:
		if p.onWait != nil {
			p.onWait()
		}
		select {
		case s = <-p.slots:
		case <-ctx.Done():
			return nil, fmt.Errorf("hsm: waiting for a session on token %q: %w", p.tok.label, ctx.Err())
		case <-p.done:
			return nil, plugin.ErrClosed
		}
	}
	if !s.open {
		if err := p.open(s); err != nil {
			p.slots <- s
			return nil, err
		}
	}
	return s, nil
}

// release returns s to the pool, first closing it if it was marked broken.
func (p *pool) release(s *session) {
	if s.broken && s.open {
		_ = p.tok.ctx.CloseSession(s.h) // it is already unusable; the error adds nothing
		s.open = false
	}
	s.broken = false
	p.slots <- s
}

// closeAll closes every session. All slots must be in the pool (no user holds one).
func (p *pool) closeAll() error {
	var errs []error
	n := len(p.slots)
	for range n {
		s := <-p.slots
		if s.open {
			if err := p.tok.ctx.CloseSession(s.h); err != nil && classify(err) != rvSession {
				errs = append(errs, fmt.Errorf("hsm: C_CloseSession on token %q: %w", p.tok.label, err))
			}
			s.open = false
		}
		p.slots <- s
	}
	return errors.Join(errs...)
}
