package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hwkms/hwkms/plugin/config"
)

// cmdDoctor checks everything serve needs, without serving, and prints one line per
// check: "[ok|FAIL|warn] check: detail (fix: hint)". It exits 0 only if no check
// failed, i.e. serve can start with this config on this host. Warnings do not fail.
func cmdDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("doctor", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of each device check")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return errors.New("doctor: --config is required")
	}
	d := &doctor{w: stdout, timeout: *timeout}
	d.run(ctx, *path)
	switch {
	case d.pinRefused:
		return exitPINRefused
	case d.failed:
		return exitError(1)
	}
	return nil
}

type doctor struct {
	w          io.Writer
	timeout    time.Duration
	failed     bool
	pinRefused bool // a token refused its PIN: exit exitPINRefused
}

func (d *doctor) line(status, check, detail, fix string) {
	if status == "FAIL" {
		d.failed = true
	}
	s := fmt.Sprintf("[%s] %s: %s", status, check, oneLine(detail))
	if fix != "" {
		s += " (fix: " + fix + ")"
	}
	fmt.Fprintln(d.w, s)
}

func (d *doctor) ok(check, detail string)        { d.line("ok", check, detail, "") }
func (d *doctor) warn(check, detail, fix string) { d.line("warn", check, detail, fix) }
func (d *doctor) fail(check, detail, fix string) { d.line("FAIL", check, detail, fix) }

// doctor receives the device checks of each backend (config.Backend.Check).
var _ config.Checker = (*doctor)(nil)

// OK implements config.Checker.
func (d *doctor) OK(check, detail string) { d.ok(check, detail) }

// Warn implements config.Checker.
func (d *doctor) Warn(check, detail, fix string) { d.warn(check, detail, fix) }

// Fail implements config.Checker.
func (d *doctor) Fail(check, detail, fix string) { d.fail(check, detail, fix) }

// PINRefused implements config.Checker.
func (d *doctor) PINRefused() { d.pinRefused = true }

// oneLine keeps a detail on one line (errors.Join separates with newlines).
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func (d *doctor) run(ctx context.Context, path string) {
	cfg, err := config.Load(path)
	if err != nil {
		d.fail("config", err.Error(), "correct the fields named above; see deploy/hwkms.yaml")
		return
	}
	d.ok("config", fmt.Sprintf("%s parses (%d keys, socket %s)", path, len(cfg.Keys), cfg.Socket.Path))
	if err := cfg.RememberRefusedPINs(false); err != nil {
		d.fail("refused-PIN record", err.Error(), "remove the damaged file; it only stops hwkms from presenting a PIN the token refused")
		return
	}
	served := d.checkSocket(cfg.Socket.Path)
	if cfg.Metrics.Address != "" {
		d.checkMetrics(cfg.Metrics.Address)
	}
	for i, k := range cfg.Keys {
		role := "decrypt-only"
		if i == 0 {
			role = "primary"
		}
		name := fmt.Sprintf("keys[%d] (%s, %s)", i, k.Backend(), role)
		b, err := k.Resolve()
		if err != nil {
			d.fail(name, err.Error(), "")
			continue
		}
		b.Check(ctx, d, config.CheckOptions{Name: name, Index: i, ConfigPath: path, Timeout: d.timeout, SocketServed: served})
	}
}

// checkSocket checks the socket directory and that no process serves the socket. It
// reports whether a process serves it.
func (d *doctor) checkSocket(path string) (served bool) {
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		parent := dir
		for {
			parent = filepath.Dir(parent)
			if _, err := os.Stat(parent); err == nil || parent == "/" {
				break
			}
		}
		if syscall.Access(parent, 0o2|0o1) == nil {
			d.warn("socket directory", dir+" does not exist; serve will create it (mode 0750)", "create it ahead with the owner and group kube-apiserver needs")
		} else {
			d.fail("socket directory", dir+" does not exist and "+parent+" is not writable", "create "+dir+" for the hwkms user, or allow it (systemd: ReadWritePaths=)")
		}
	case err != nil:
		d.fail("socket directory", err.Error(), "")
	case !fi.IsDir():
		d.fail("socket directory", dir+" is not a directory", "choose a socket.path in a directory")
	case syscall.Access(dir, 0o2|0o1) != nil:
		d.fail("socket directory", fmt.Sprintf("%s is not writable by uid %d", dir, os.Geteuid()), "chown the directory to the hwkms user, or allow it (systemd: ReadWritePaths=, static pod: hostPath)")
	default:
		d.ok("socket directory", dir+" exists and is writable")
	}

	fi, err = os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		d.ok("socket", path+" is free")
	case err != nil:
		d.fail("socket", err.Error(), "")
	case fi.Mode()&fs.ModeSocket == 0:
		d.fail("socket", path+" exists and is not a socket; serve refuses to replace it", "remove it or choose another socket.path")
	default:
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			d.fail("socket", path+" is served by another process", "stop the other hwkms (systemctl stop hwkms) or choose another socket.path")
			return true
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			d.ok("socket", path+" is a stale socket nobody serves; serve will replace it")
		} else {
			d.fail("socket", "cannot tell whether "+path+" is served: "+err.Error(), "")
		}
	}
	return false
}

func (d *doctor) checkMetrics(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		d.fail("metrics listener", err.Error(), "choose a free metrics.address port or stop what uses it")
		return
	}
	ln.Close()
	d.ok("metrics listener", addr+" can be bound")
}
