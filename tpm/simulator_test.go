package tpm

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// simTPM is the in-process go-tpm-tools simulator (test code only: it is cgo over
// OpenSSL and never linked into bin/hwkms) served on a unix socket, so that the
// production Open path reaches it through Config.Device "unix://..." exactly as it
// reaches swtpm, with no test hook in the package. Like swtpm it serves one
// connection at a time. With a fixed seed its hierarchy seeds, hence its SRK and EK,
// are the same on every run.
type simTPM struct {
	// Device is the value for Config.Device.
	Device string

	sim  *simulator.Simulator
	ln   net.Listener
	done chan struct{}
	mu   sync.Mutex
	cur  net.Conn
}

// newSimTPM starts the simulator with hierarchy seeds derived from seed. The
// simulator is one per process: a second newSimTPM waits until the first is
// closed (at its test's cleanup).
func newSimTPM(t testing.TB, seed int64) *simTPM {
	t.Helper()
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	dir, err := os.MkdirTemp("", "hwkms-sim-") // short: unix socket paths are limited
	if err != nil {
		sim.Close()
		t.Fatal(err)
	}
	path := filepath.Join(dir, "tpm.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		sim.Close()
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	s := &simTPM{Device: "unix://" + path, sim: sim, ln: ln, done: make(chan struct{})}
	go s.serve()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		if s.cur != nil {
			s.cur.Close()
		}
		s.mu.Unlock()
		<-s.done
		if err := sim.Close(); err != nil {
			t.Errorf("simulator close: %v", err)
		}
		os.RemoveAll(dir)
	})
	return s
}

// serve answers one connection at a time until the listener closes.
func (s *simTPM) serve() {
	defer close(s.done)
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.cur = c
		s.mu.Unlock()
		s.handle(c)
		c.Close()
	}
}

// handle runs every command read from c on the simulator and writes the response.
func (s *simTPM) handle(c net.Conn) {
	for {
		cmd, err := readFrame(c)
		if err != nil {
			return
		}
		if _, err := s.sim.Write(cmd); err != nil {
			return
		}
		rsp, err := io.ReadAll(s.sim)
		if err != nil && !errors.Is(err, io.EOF) {
			return
		}
		if _, err := c.Write(rsp); err != nil {
			return
		}
	}
}

// TestSimulatorAnswers checks that the in-process simulator starts and answers
// TPM2_GetRandom, directly and through the socket tpm connects to.
func TestSimulatorAnswers(t *testing.T) {
	s := newSimTPM(t, 1)
	rsp, err := tpm2.GetRandom{BytesRequested: 16}.Execute(transport.FromReadWriter(s.sim))
	if err != nil {
		t.Fatalf("GetRandom: %v", err)
	}
	if len(rsp.RandomBytes.Buffer) != 16 {
		t.Fatalf("GetRandom returned %d bytes, want 16", len(rsp.RandomBytes.Buffer))
	}
	if err := CheckDevice(testCtx(t), Config{Device: s.Device}); err != nil {
		t.Fatalf("CheckDevice over the simulator socket: %v", err)
	}
}
