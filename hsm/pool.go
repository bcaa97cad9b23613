package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// session is one slot of the pool. A slot may be empty (open false) after its session
// was dropped; acquire opens a fresh one.
//
// A session belongs to the module generation it was opened in (module.gen). After a
// re-initialisation its handle is meaningless, and may even name a session opened since:
// it is forgotten, never closed.
type session struct {
	h      pkcs11.SessionHandle
	gen    uint64
	open   bool
	broken bool // set by the user: close it on release
}

// pool is a fixed number of read-only sessions on one token, each used by one
// goroutine at a time (PKCS#11 sessions are not safe for concurrent operations).
// acquire only waits for a slot; opening a session (ready) and release make device
// calls and must be called holding tok.mod.gate for reading.
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
	tok.mod.gate.RLock()
	defer tok.mod.gate.RUnlock()
	gen := tok.mod.gen.Load()
	for range n {
		s := &session{}
		if err := p.ready(s, gen); err != nil {
			p.slots <- s
			p.closeAllLocked(gen)
			return nil, asTokenError(tok, err)
		}
		p.slots <- s
	}
	return p, nil
}

// ready makes s an open session of generation gen: a session of an older generation
// is forgotten, and an empty slot gets a new session. It returns the C_OpenSession
// error as an opError.
func (p *pool) ready(s *session, gen uint64) error {
	if s.open && s.gen != gen {
		s.open = false
	}
	if s.open {
		return nil
	}
	h, err := p.tok.ctx.OpenSession(p.tok.slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return opError{op: "C_OpenSession", err: err}
	}
	s.h, s.gen, s.open, s.broken = h, gen, true, false
	return nil
}

// acquire takes a slot from the pool, waiting at most until ctx is done or the KEK
// closes. It makes no device call: the holder calls ready before use. Pair it with
// release.
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
			return nil, kek.ErrClosed
		}
	}
	return s, nil
}

// release returns s to the pool, first closing it if it was marked broken and still
// belongs to generation gen. The caller holds tok.mod.gate for reading.
func (p *pool) release(s *session, gen uint64) {
	if s.open && s.gen != gen {
		s.open = false
	}
	if s.broken && s.open {
		_ = p.tok.ctx.CloseSession(s.h) // it is already unusable; the error adds nothing
		s.open = false
	}
	s.broken = false
	p.slots <- s
}

// closeAll closes every session of the current generation. All slots must be in the
// pool (no user holds one).
func (p *pool) closeAll() error {
	p.tok.mod.gate.RLock()
	defer p.tok.mod.gate.RUnlock()
	return p.closeAllLocked(p.tok.mod.gen.Load())
}

func (p *pool) closeAllLocked(gen uint64) error {
	var errs []error
	n := len(p.slots)
	for range n {
		s := <-p.slots
		if s.open && s.gen == gen {
			if err := p.tok.ctx.CloseSession(s.h); err != nil && classify(err) == rvOther {
				errs = append(errs, fmt.Errorf("hsm: C_CloseSession on token %q: %w", p.tok.label, err))
			}
		}
		s.open = false
		p.slots <- s
	}
	return errors.Join(errs...)
}
