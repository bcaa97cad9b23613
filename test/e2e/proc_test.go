package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is one child process whose output goes to a log file. It is stopped by its PID.
type proc struct {
	name string
	path string // log file
	cmd  *exec.Cmd
	done chan struct{} // closed after Wait
	mu   sync.Mutex
	err  error // Wait's result, valid after done
}

// startProc starts bin with args and env (added to this process's environment), its
// stdout and stderr appended to logPath. The process is killed if the test binary
// dies (Pdeathsig); callers stop it with stop, normally from t.Cleanup.
func startProc(t testing.TB, name, logPath, bin string, args, env []string) *proc {
	t.Helper()
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatalf("%s: log file: %v", name, err)
	}
	defer f.Close()
	fmt.Fprintf(f, "=== %s %s: %s %s\n", time.Now().Format(time.RFC3339Nano), name, bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: start %s: %v", name, bin, err)
	}
	p := &proc{name: name, path: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p
}

// pid returns the process id.
func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended, and its Wait error.
func (p *proc) exited() (bool, error) {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		return true, p.err
	default:
		return false, nil
	}
}

// stop sends sig to the process by PID and waits up to grace for it to exit, then
// sends SIGKILL. It is a no-op on a process that has already exited.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) {
	if done, _ := p.exited(); done {
		return
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		p.cmd.Process.Kill()
	}
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	p.cmd.Process.Kill()
	<-p.done
}

// signal sends sig without waiting.
func (p *proc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("%s: signal %v to pid %d: %v", p.name, sig, p.pid(), err)
	}
}

// logTail returns up to the last n lines of the process's log file.
func (p *proc) logTail(n int) string { return fileTail(p.path, n) }

func fileTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// dumpLogsOnFailure logs the tail of every log file in dir when the test failed.
func dumpLogsOnFailure(t testing.TB, dir string) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
		for _, l := range logs {
			t.Logf("---- last lines of %s ----\n%s", filepath.Base(l), fileTail(l, 40))
		}
	})
}

// freePort returns a loopback TCP port that was free a moment ago. Callers retry when
// another process takes it before their server binds it.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pick a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond every interval until it returns nil, the process p (if not nil)
// exits, or timeout passes. It returns the last error from cond on timeout.
func waitFor(ctx context.Context, timeout, interval time.Duration, p *proc, cond func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = cond(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		if p != nil {
			if done, err := p.exited(); done {
				return fmt.Errorf("%s (pid %d) exited (%v) while waiting; last error: %w", p.name, p.pid(), err, last)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %s: %w", timeout, last)
		case <-time.After(interval):
		}
	}
}

// shortTempDir returns a short private directory, removed in t.Cleanup, for unix
// sockets (sun_path is limited to 108 bytes and t.TempDir paths carry the test name).
func shortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// binaryPath returns the path in the environment variable env, which `make e2e` sets,
// and fails the test with a clear message if it is unset or missing.
func binaryPath(t testing.TB, env string) string {
	t.Helper()
	p := os.Getenv(env)
	if p == "" {
		t.Fatalf("%s is not set: run the suite with `make e2e` from the repository root, which builds the binaries and sets it", env)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s=%s: %v (run `make e2e`)", env, p, err)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}
