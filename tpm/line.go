package tpm

import (
	"context"
	"sync"
)

// line is the single connection this process keeps to a TPM that has no resource
// manager (/dev/tpm0, swtpm). Such a TPM accepts one connection at a time (the kernel
// refuses a second open of /dev/tpm0; swtpm serves its clients one after the other),
// and a KEK that dialled its own connection would flush every other KEK's objects
// (see connect). So every KEK on the same device shares one line and one semaphore,
// and at most one of them, the owner, has its objects and sessions loaded. A KEK that
// needs the TPM while another owns it evicts the owner (flushes its sessions and
// transient KEK) and loads its own: the TPM's few object and session slots (three
// each on swtpm) then never hold more than one KEK's state.
//
// Switching costs a KEK load and two salted sessions (about 1.3 ms on swtpm, see
// BenchmarkUnsealSwitch). It happens
// only when requests alternate between keys, which after a rotation is rare:
// kube-apiserver decrypts each old DEK seed once and caches it.
//
// KEKs on a TPM with a resource manager (/dev/tpmrm*) keep a connection each: the
// kernel gives each its own virtual handle space and they do not contend here.
type line struct {
	key string
	sem chan struct{} // held while using c and the owner's connection state

	adm admission // shared by the KEKs on this line (admission.go)

	// Guarded by sem.
	c     *conn
	owner *KEK

	refs int // guarded by linesMu
}

var (
	linesMu sync.Mutex
	lines   = map[string]*line{}
)

// acquireLine returns the line for dev, creating it on first use; releaseLine
// undoes it.
func acquireLine(dev device) *line {
	linesMu.Lock()
	defer linesMu.Unlock()
	l := lines[dev.String()]
	if l == nil {
		l = &line{key: dev.String(), sem: make(chan struct{}, 1)}
		lines[l.key] = l
	}
	l.refs++
	return l
}

// releaseLine drops one reference; the last closes the connection. The caller holds
// l.sem.
func releaseLine(l *line) error {
	linesMu.Lock()
	defer linesMu.Unlock()
	l.refs--
	if l.refs > 0 {
		return nil
	}
	delete(lines, l.key)
	if l.c == nil {
		return nil
	}
	err := l.c.Close()
	l.c, l.owner = nil, nil
	return err
}

// evict flushes the sessions and transient KEK of the line's owner, if another KEK
// than k owns it, so k can load its own. If a flush fails, the connection is closed
// instead: the next dial flushes every leftover. The caller holds l.sem.
func (l *line) evict(ctx context.Context, k *KEK) {
	o := l.owner
	if o == nil || o == k {
		return
	}
	if err := o.flushOwn(ctx); err != nil {
		l.drop()
		return
	}
	o.forget()
	l.owner = nil
}

// drop closes the connection and forgets every KEK's state on it. The caller holds
// l.sem.
func (l *line) drop() error {
	var err error
	if l.c != nil {
		err = l.c.Close()
	}
	if l.owner != nil {
		l.owner.forget()
	}
	l.c, l.owner = nil, nil
	return err
}
