package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// recoveryLimit is the reliability target: first success within this long after a
// fault clears (docs/reliability.md).
const recoveryLimit = 2 * time.Second

// rcProxy sits between the KEK and swtpm on a unix socket and forwards the TPM command
// stream, except that while rc is set it answers every command itself with that
// response code (a 10-byte response; the TPM never sees the command).
type rcProxy struct {
	path   string
	target string
	ln     net.Listener
	mu     sync.Mutex
	rc     tpm2.TPMRC
	once   int // answer only this many more commands with rc, if > 0
	hits   int
	wg     sync.WaitGroup
}

func newRCProxy(t *testing.T, sim *swtpm.Sim) *rcProxy {
	t.Helper()
	dir, err := os.MkdirTemp("", "rcproxy")
	if err != nil {
		t.Fatal(err)
	}
	p := &rcProxy{path: filepath.Join(dir, "p.sock"), target: strings.TrimPrefix(sim.Device, "unix://")}
	p.ln, err = net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() { p.ln.Close(); p.wg.Wait(); os.RemoveAll(dir) })
	return p
}

func (p *rcProxy) set(rc tpm2.TPMRC, once int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rc, p.once = rc, once
}

func (p *rcProxy) serve() { serveProxy(p.ln, &p.wg, p.target, p.pump) }

func (p *rcProxy) pump(c, up net.Conn) {
	for {
		cmd, err := readFrame(c)
		if err != nil {
			return
		}
		p.mu.Lock()
		rc := p.rc
		if rc != 0 {
			p.hits++
			if p.once > 0 {
				p.once--
				if p.once == 0 {
					p.rc = 0
				}
			}
		}
		p.mu.Unlock()
		if rc != 0 {
			rsp := make([]byte, 10)
			binary.BigEndian.PutUint16(rsp[0:], uint16(tpm2.TPMSTNoSessions))
			binary.BigEndian.PutUint32(rsp[2:], 10)
			binary.BigEndian.PutUint32(rsp[6:], uint32(rc))
			if _, err := c.Write(rsp); err != nil {
				return
			}
			continue
		}
		if _, err := up.Write(cmd); err != nil {
			return
		}
		rsp, err := readFrame(up)
		if err != nil {
			return
		}
		if _, err := c.Write(rsp); err != nil {
			return
		}
	}
}

func readFrame(r io.Reader) ([]byte, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:6])
	if n < 10 || n > 1<<16 {
		return nil, errors.New("bad frame size")
	}
	b := make([]byte, n)
	copy(b, hdr[:])
	_, err := io.ReadFull(r, b[10:])
	return b, err
}

// tpmRig is a plugin.Service on a TPM KEK.
type tpmRig struct {
	k    *KEK
	svc  *plugin.Service
	seed []byte
	ct   []byte
}

func newTPMRig(t *testing.T, sim *swtpm.Sim, device string) *tpmRig {
	t.Helper()
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	cfg.Device = device
	k := openKEK(t, sim, cfg)
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	r := &tpmRig{k: k, seed: bytes.Repeat([]byte{0xa5}, 32),
		svc: plugin.NewService(ring, plugin.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})}
	resp, err := r.svc.Encrypt(testCtx(t), "setup", r.seed)
	if err != nil {
		t.Fatal(err)
	}
	r.ct = resp.Ciphertext
	return r
}

// call runs Decrypt of the known ciphertext and an Encrypt+Decrypt round trip, each
// with its own deadline; it returns the first failure's code or OK. Wrong data fails
// the test.
func (r *tpmRig) call(t *testing.T, deadline time.Duration) codes.Code {
	t.Helper()
	do := func(fn func(ctx context.Context) error) error {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		return fn(ctx)
	}
	check := func(pt []byte) {
		if !bytes.Equal(pt, r.seed) {
			t.Fatalf("answered wrong data: %x", pt)
		}
	}
	var ct []byte
	for _, fn := range []func(ctx context.Context) error{
		func(ctx context.Context) error {
			pt, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: r.ct, KeyID: r.k.ID()})
			if err == nil {
				check(pt)
			}
			return err
		},
		func(ctx context.Context) error {
			resp, err := r.svc.Encrypt(ctx, "t", r.seed)
			if err == nil {
				ct = resp.Ciphertext
			}
			return err
		},
		func(ctx context.Context) error {
			pt, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: ct, KeyID: r.k.ID()})
			if err == nil {
				check(pt)
			}
			return err
		},
	} {
		if err := do(fn); err != nil {
			return status.Code(err)
		}
	}
	return codes.OK
}

func (r *tpmRig) during(t *testing.T, d, deadline time.Duration, want ...codes.Code) map[codes.Code]int {
	t.Helper()
	seen := map[codes.Code]int{}
	for end := time.Now().Add(d); time.Now().Before(end); {
		start := time.Now()
		code := r.call(t, deadline)
		seen[code]++
		if !slicesContains(want, code) {
			t.Fatalf("during the fault a call answered %v, want one of %v", code, want)
		}
		if took := time.Since(start); took > 3*deadline+time.Second {
			t.Fatalf("a call during the fault took %v, deadline %v per RPC", took, deadline)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("during the fault: %v", seen)
	return seen
}

// untilOK returns the time from now to the first fully successful call.
func (r *tpmRig) untilOK(t *testing.T) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		code := r.call(t, time.Second)
		if code == codes.OK {
			d := time.Since(start)
			t.Logf("recovered %v after the fault cleared", d.Round(time.Millisecond))
			if d > recoveryLimit {
				t.Errorf("recovery took %v, want < %v", d, recoveryLimit)
			}
			return d
		}
		if code != codes.Unavailable && code != codes.DeadlineExceeded {
			t.Fatalf("after the fault cleared a call answered %v", code)
		}
		if time.Since(start) > 4*recoveryLimit {
			t.Fatalf("no recovery %v after the fault cleared", time.Since(start))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func slicesContains(cs []codes.Code, c codes.Code) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}

// TestFaultSwtpmKilled: swtpm is killed (SIGKILL) and started again on the same state.
// During the outage clients see Unavailable (or DeadlineExceeded) by their deadline;
// after it, the plugin recovers without a restart.
func TestFaultSwtpmKilled(t *testing.T) {
	sim := swtpmtest.New(t)
	r := newTPMRig(t, sim, sim.Device)
	if err := sim.Kill(); err != nil {
		t.Fatal(err)
	}
	r.during(t, time.Second, 300*time.Millisecond, codes.Unavailable, codes.DeadlineExceeded)
	if err := sim.Resume(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	r.untilOK(t)
	assertOnlyOwn(t, r.k)
}

// TestFaultRCRetry: the TPM answers TPM_RC_RETRY. Short bursts are retried inside
// the call (the client sees nothing); a TPM that keeps answering it gives
// DeadlineExceeded at the deadline; when it stops, the next call succeeds.
func TestFaultRCRetry(t *testing.T) {
	sim := swtpmtest.New(t)
	p := newRCProxy(t, sim)
	r := newTPMRig(t, sim, "unix://"+p.path)

	p.set(tpm2.TPMRCRetry, 5)
	if code := r.call(t, 2*time.Second); code != codes.OK {
		t.Fatalf("call with 5 TPM_RC_RETRY answers = %v, want OK (retried inside the call)", code)
	}
	p.set(tpm2.TPMRCRetry, 0)
	r.during(t, time.Second, 200*time.Millisecond, codes.DeadlineExceeded, codes.Unavailable)
	p.set(0, 0)
	r.untilOK(t)
}

// TestFaultRCInitialize: the TPM answers TPM_RC_INITIALIZE (it was restarted and
// not started). hwkms drops the connection, reconnects, sends TPM2_Startup, reloads
// the KEK and retries once. While every answer is TPM_RC_INITIALIZE clients see
// Unavailable; afterwards the plugin recovers by itself.
func TestFaultRCInitialize(t *testing.T) {
	sim := swtpmtest.New(t)
	p := newRCProxy(t, sim)
	r := newTPMRig(t, sim, "unix://"+p.path)

	p.set(tpm2.TPMRCInitialize, 1)
	if code := r.call(t, 2*time.Second); code != codes.OK {
		t.Fatalf("call after one TPM_RC_INITIALIZE = %v, want OK (reconnected inside the call)", code)
	}
	p.set(tpm2.TPMRCInitialize, 0)
	r.during(t, time.Second, 300*time.Millisecond, codes.Unavailable, codes.DeadlineExceeded)
	p.set(0, 0)
	r.untilOK(t)
	assertOnlyOwn(t, r.k)
}

// TestFaultTPMReset: a platform reset of the running TPM (`swtpm_ioctl -i`): loaded
// objects and sessions are gone and it answers TPM_RC_INITIALIZE. The next request
// reconnects, runs TPM2_Startup, reloads the KEK and succeeds; data sealed before the
// reset still unwraps.
func TestFaultTPMReset(t *testing.T) {
	sim := swtpmtest.New(t)
	r := newTPMRig(t, sim, sim.Device)
	for i := range 3 {
		if err := sim.Reset(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		d := r.untilOK(t)
		t.Logf("reset %d: first success %v after the reset", i, d)
	}
	assertOnlyOwn(t, r.k)
}
