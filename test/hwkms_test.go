package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/softhsm"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// Deadlines of the helpers. They bound waits; nothing sleeps for a fixed time.
const (
	readyTimeout = 30 * time.Second // hwkms answers a healthy Status
	stopTimeout  = 15 * time.Second // hwkms exits after SIGTERM (its shutdown timeout is 5 s)
	rpcTimeout   = 3 * time.Second  // one RPC, as the EncryptionConfiguration says
	pollEvery    = 25 * time.Millisecond
)

var (
	// hwkmsBin is the hwkms binary TestMain built.
	hwkmsBin string
	// softhsmErr says why SoftHSM2 cannot be used, or is nil.
	softhsmErr error
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "hwkms-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "TestMain:", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	hwkmsBin = filepath.Join(tmp, "hwkms")
	build := exec.Command("go", "build", "-o", hwkmsBin, "github.com/hwkms/hwkms/cmd/hwkms")
	build.Dir = ".." // the plugin's module root, so its own go.mod decides the build
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "TestMain: go build hwkms: %v\n%s", err, out)
		return 1
	}
	if _, err := softhsm.Module(); err != nil {
		softhsmErr = err
	} else if _, err := softhsm.Util(); err != nil {
		softhsmErr = err
	}
	// The interop matrix opens SoftHSM2 in this process too (softhsm/interop), which
	// reads SOFTHSM2_CONF once per process: softhsmtest sets it. Every hwkms child
	// gets its own SOFTHSM2_CONF (dev sets it, serve gets softhsmEnv).
	return softhsmtest.Run(m)
}

// requireSoftHSM skips tb when SoftHSM2 is not installed, unless CI is set: in CI a
// missing SoftHSM2 is a broken runner and fails the test.
func requireSoftHSM(tb testing.TB) {
	tb.Helper()
	if softhsmErr == nil {
		return
	}
	if os.Getenv("CI") == "" {
		tb.Skipf("SoftHSM2 is not installed (apt-get install softhsm2): %v", softhsmErr)
	}
	tb.Fatalf("SoftHSM2 is required in CI: %v", softhsmErr)
}

// socketPath returns a socket path in a fresh short directory: t.TempDir paths of long
// test names can pass the 107-byte limit of unix socket paths.
func socketPath(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "hk")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	p := filepath.Join(dir, "kms.sock")
	if len(p) >= 100 {
		tb.Fatalf("socket path %q is %d bytes; set TMPDIR to a shorter directory", p, len(p))
	}
	return p
}

// syncBuffer is a bytes.Buffer safe for the exec copy goroutine and the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

// proc is one running hwkms process.
type proc struct {
	Socket string
	// Dir is the dev work dir (token, hwkms.yaml, user.pin); empty for serve.
	Dir            string
	Stdout, Stderr *syncBuffer

	cmd     *exec.Cmd
	exited  chan struct{} // closed when Wait returned
	waitErr error
	stopped bool
}

// startHwkms starts the hwkms binary with args and extra environment, registers a
// cleanup that stops it, and returns once Status on socket answers healthy. It fails tb
// if the process exits first or the deadline passes.
func startHwkms(tb testing.TB, socket string, env []string, args ...string) *proc {
	tb.Helper()
	p := launch(tb, env, args...)
	p.Socket = socket
	tb.Cleanup(func() { p.stop(tb) })
	p.waitReady(tb)
	return p
}

// launch starts hwkms without waiting for anything.
func launch(tb testing.TB, env []string, args ...string) *proc {
	tb.Helper()
	p := &proc{Stdout: &syncBuffer{}, Stderr: &syncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(hwkmsBin, args...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.Stdout, p.Stderr
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("start hwkms %v: %v", args, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	return p
}

// startDev runs `hwkms dev` on a new socket with a token directory in tb.TempDir, at
// log level level ("debug" logs one line per request).
func startDev(tb testing.TB, level string) *proc {
	tb.Helper()
	requireSoftHSM(tb)
	sock, dir := socketPath(tb), tb.TempDir()
	p := startHwkms(tb, sock, nil, "dev", "--socket", sock, "--dir", dir, "--log-level", level)
	p.Dir = dir
	if !strings.Contains(p.Stdout.String(), "endpoint: unix://"+sock) {
		tb.Errorf("dev banner does not name the endpoint unix://%s:\n%s", sock, p.Stdout.String())
	}
	return p
}

// softhsmEnv is the environment a `hwkms serve` needs to find the token that `hwkms dev`
// created in dir: SoftHSM2 reads its token directory from SOFTHSM2_CONF.
func softhsmEnv(dir string) []string {
	return []string{softhsm.ConfEnv + "=" + filepath.Join(dir, "softhsm", "softhsm2.conf")}
}

// serveDevConfig runs `hwkms serve --config DIR/hwkms.yaml` on the token and socket
// that dev process d created: a restart of the plugin with the same key.
func serveDevConfig(tb testing.TB, d *proc) *proc {
	tb.Helper()
	p := startHwkms(tb, d.Socket, softhsmEnv(d.Dir), "serve", "--config", filepath.Join(d.Dir, "hwkms.yaml"))
	p.Dir = d.Dir
	return p
}

// waitReady polls a real Status RPC until it answers healthz "ok".
func (p *proc) waitReady(tb testing.TB) {
	tb.Helper()
	deadline := time.Now().Add(readyTimeout)
	var last string
	for {
		select {
		case <-p.exited:
			tb.Fatalf("hwkms exited before it was ready: %v\nstderr:\n%s", p.waitErr, p.Stderr.String())
		default:
		}
		if _, err := os.Stat(p.Socket); err == nil {
			st, err := statusOnce(p.Socket)
			switch {
			case err != nil:
				last = err.Error()
			case st.Healthz == "ok":
				return
			default:
				last = "healthz " + st.Healthz
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			tb.Fatalf("hwkms not ready after %s: %s\nstderr:\n%s", readyTimeout, last, p.Stderr.String())
		}
		time.Sleep(pollEvery)
	}
}

func statusOnce(socket string) (*kmsapi.StatusResponse, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	return kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
}

// wait waits for the process to exit within d and returns its exit code (-1 if it was
// killed by a signal).
func (p *proc) wait(tb testing.TB, d time.Duration) int {
	tb.Helper()
	select {
	case <-p.exited:
	case <-time.After(d):
		p.cmd.Process.Kill()
		<-p.exited
		tb.Fatalf("hwkms did not exit within %s; killed it\nstderr:\n%s", d, p.Stderr.String())
	}
	var ee *exec.ExitError
	switch {
	case p.waitErr == nil:
		return 0
	case errors.As(p.waitErr, &ee):
		return ee.ExitCode()
	default:
		tb.Fatalf("wait for hwkms: %v", p.waitErr)
		return -1
	}
}

// stop sends SIGTERM to the process, and checks that it exits 0 within stopTimeout and
// removes its socket. It is idempotent.
func (p *proc) stop(tb testing.TB) {
	tb.Helper()
	if p.stopped {
		return
	}
	p.stopped = true
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		tb.Errorf("SIGTERM hwkms (pid %d): %v", p.cmd.Process.Pid, err)
	}
	if code := p.wait(tb, stopTimeout); code != 0 {
		tb.Errorf("hwkms exited with code %d after SIGTERM; stderr:\n%s", code, p.Stderr.String())
	}
	if _, err := os.Lstat(p.Socket); !errors.Is(err, fs.ErrNotExist) {
		tb.Errorf("socket %s still exists after hwkms stopped (Lstat: %v)", p.Socket, err)
	}
}

// kill sends SIGKILL and waits: the socket file stays behind, as after a crash.
func (p *proc) kill(tb testing.TB) {
	tb.Helper()
	p.stopped = true
	if err := p.cmd.Process.Kill(); err != nil {
		tb.Fatalf("SIGKILL hwkms: %v", err)
	}
	if code := p.wait(tb, stopTimeout); code != -1 {
		tb.Errorf("hwkms exit code after SIGKILL = %d, want -1 (signal)", code)
	}
}

// dial returns a KMS v2 client on socket, closed at cleanup.
func dial(tb testing.TB, socket string) kmsapi.KeyManagementServiceClient {
	tb.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

// rpcCtx returns a context with the provider timeout, canceled at cleanup.
func rpcCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	tb.Cleanup(cancel)
	return ctx
}
