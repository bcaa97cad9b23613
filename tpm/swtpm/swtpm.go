// Package swtpm runs a throwaway swtpm (software TPM 2.0) process for tests and for
// `hwkms dev --backend tpm`. It is a fixture, never a production path.
//
// Start launches `swtpm socket --tpm2` with its state in a directory, serving the
// TPM command stream (raw TPM 2.0 commands, no extra framing) on a unix socket (Start)
// or on a free loopback TCP port chosen at run time (StartTCP). It returns once a
// TPM2_GetRandom answers; it never sleeps a fixed time. swtpm is started with
// `--flags not-need-init,startup-clear`, so the TPM is powered on and TPM2_Startup(CLEAR)
// has run before the first command. A control channel (swtpm's --ctrl, a unix socket
// next to the server socket) lets Reset re-initialise the TPM as a platform reset does.
//
// swtpm serves one client connection at a time and has no resource manager.
package swtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Binary is the swtpm executable looked up in PATH.
const Binary = "swtpm"

// ErrNotInstalled is returned by Start when the swtpm binary is not in PATH.
var ErrNotInstalled = errors.New("swtpm: binary not found in PATH (install the swtpm and swtpm-tools packages)")

// Sim is a running swtpm process. Its methods are safe for concurrent use.
type Sim struct {
	// Dir holds the TPM state (tpm2-00.permall) and the log file swtpm.log.
	Dir string
	// Device is the value for tpm.Config.Device: "unix:///path" or "tcp://127.0.0.1:port".
	Device string

	network   string // "unix" or "tcp"
	address   string // socket path or host:port
	sockDir   string // short temp dir holding the unix sockets, removed by Close
	ctrl      string // control channel socket path
	noStartup bool

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been waited for
}

// Options tune StartWith.
type Options struct {
	// TCP serves on a free loopback TCP port instead of a unix socket.
	TCP bool
	// NoStartup leaves the TPM powered on but not started: the first command
	// answers TPM_RC_INITIALIZE until a client sends TPM2_Startup.
	NoStartup bool
}

// Start launches swtpm serving on a unix socket, with its state in dir (created if
// missing; reused if it already holds a TPM state), and waits until a TPM command
// answers or ctx ends.
func Start(ctx context.Context, dir string) (*Sim, error) {
	return StartWith(ctx, dir, Options{})
}

// StartTCP is Start with the server on a free loopback TCP port chosen at run time
// (the port is kept across Restart).
func StartTCP(ctx context.Context, dir string) (*Sim, error) {
	return StartWith(ctx, dir, Options{TCP: true})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, dir string, opts Options) (*Sim, error) {
	if _, err := exec.LookPath(Binary); err != nil {
		return nil, ErrNotInstalled
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("swtpm: state dir: %w", err)
	}
	// sun_path is limited to 108 bytes and test temp dirs are long: keep the
	// sockets in a short private directory.
	sockDir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		return nil, fmt.Errorf("swtpm: socket dir: %w", err)
	}
	ctrl := filepath.Join(sockDir, "ctrl.sock")
	if !opts.TCP {
		path := filepath.Join(sockDir, "tpm.sock")
		s := &Sim{Dir: dir, Device: "unix://" + path, network: "unix", address: path, sockDir: sockDir, ctrl: ctrl, noStartup: opts.NoStartup}
		if err := s.start(ctx); err != nil {
			os.RemoveAll(sockDir)
			return nil, err
		}
		return s, nil
	}
	var lastErr error
	for range 5 { // another process may take the port between probe and bind
		port, err := freePort()
		if err != nil {
			os.RemoveAll(sockDir)
			return nil, err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		s := &Sim{Dir: dir, Device: "tcp://" + addr, network: "tcp", address: addr, sockDir: sockDir, ctrl: ctrl, noStartup: opts.NoStartup}
		if lastErr = s.start(ctx); lastErr == nil {
			return s, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	os.RemoveAll(sockDir)
	return nil, lastErr
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("swtpm: pick a port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *Sim) start(ctx context.Context) error {
	server := "type=unixio,path=" + s.address
	if s.network == "tcp" {
		_, port, _ := net.SplitHostPort(s.address)
		server = "type=tcp,bindaddr=127.0.0.1,port=" + port
	}
	flags := "not-need-init,startup-clear"
	if s.noStartup {
		flags = "not-need-init"
	}
	cmd := exec.Command(Binary, "socket", "--tpm2",
		"--tpmstate", "dir="+s.Dir,
		"--server", server,
		"--ctrl", "type=unixio,path="+s.ctrl,
		"--flags", flags,
		"--log", "file="+filepath.Join(s.Dir, "swtpm.log")+",level=1",
	)
	cmd.Stdin = nil
	cmd.Stdout = nil
	cmd.Stderr = nil
	// Own process group: a Ctrl-C at the terminal reaches hwkms, which then stops swtpm
	// by PID after its own graceful shutdown; Pdeathsig covers a crashed parent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("swtpm: start: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	if err := s.waitReady(ctx, done); err != nil {
		s.kill(syscall.SIGKILL)
		return err
	}
	return nil
}

// waitReady polls with a growing interval until TPM2_GetRandom answers, the process
// exits or ctx ends.
func (s *Sim) waitReady(ctx context.Context, done <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	wait := time.Millisecond
	for {
		err := ping(ctx, s.network, s.address, s.noStartup)
		if err == nil {
			return nil
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(s.Dir, "swtpm.log"))
			return fmt.Errorf("swtpm: exited before answering: %s", tail(log, 512))
		case <-ctx.Done():
			return fmt.Errorf("swtpm: not ready: %w (last: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(wait*2, 50*time.Millisecond)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// ping sends TPM2_GetRandom(8) and checks for a TPM_RC_SUCCESS response (or
// TPM_RC_INITIALIZE when the TPM is expected not to be started).
func ping(ctx context.Context, network, address string, noStartup bool) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	if _, err := c.Write(cmd); err != nil {
		return err
	}
	var hdr [10]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(hdr[6:]); rc != 0 && !(noStartup && rc == 0x100) {
		return fmt.Errorf("GetRandom: rc 0x%x", rc)
	}
	return nil
}

// PID returns the process id of the running swtpm, or 0 when it is stopped.
func (s *Sim) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Stop terminates swtpm (SIGTERM, then SIGKILL after 5 s) by PID and waits for it.
// The state directory is kept. Stop on a stopped Sim is a no-op.
func (s *Sim) Stop() error {
	return s.kill(syscall.SIGTERM)
}

// Kill kills swtpm with SIGKILL (a crash: nothing is flushed) and waits for it.
func (s *Sim) Kill() error {
	return s.kill(syscall.SIGKILL)
}

func (s *Sim) kill(sig syscall.Signal) error {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd, s.done = nil, nil
	s.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("swtpm: signal pid %d: %w", cmd.Process.Pid, err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
	return nil
}

// Restart stops swtpm and starts it again on the same state dir and socket or port.
func (s *Sim) Restart(ctx context.Context) error {
	if err := s.Stop(); err != nil {
		return err
	}
	return s.Resume(ctx)
}

// Resume starts swtpm again after Stop or Kill, on the same state and socket or port.
func (s *Sim) Resume(ctx context.Context) error {
	s.mu.Lock()
	running := s.cmd != nil
	s.mu.Unlock()
	if running {
		return errors.New("swtpm: already running")
	}
	return s.start(ctx)
}

// IoctlBinary is the swtpm control-channel client used by Reset.
const IoctlBinary = "swtpm_ioctl"

// Reset re-initialises the running TPM through the control channel (`swtpm_ioctl -i`,
// CMD_INIT), as a platform reset does: loaded objects and sessions are gone and the TPM
// answers TPM_RC_INITIALIZE until a client sends TPM2_Startup. The process and its
// sockets stay up.
func (s *Sim) Reset(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, IoctlBinary, "--unix", s.ctrl, "-i").CombinedOutput()
	if err != nil {
		return fmt.Errorf("swtpm: %s -i: %w: %s", IoctlBinary, err, tail(out, 512))
	}
	return nil
}

// Close stops swtpm and removes the private socket directory (not Dir).
func (s *Sim) Close() error {
	err := s.Stop()
	if s.sockDir != "" {
		os.RemoveAll(s.sockDir)
	}
	return err
}
