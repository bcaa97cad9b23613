package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm"
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

// oneLine keeps a detail on one line (errors.Join separates with newlines).
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func (d *doctor) run(ctx context.Context, path string) {
	cfg, err := config.Load(path)
	if err != nil {
		d.fail("config", err.Error(), "correct the fields named above; see deploy/hwkms.yaml")
		return
	}
	d.ok("config", fmt.Sprintf("%s parses (%d keys, socket %s)", path, len(cfg.Keys), cfg.Socket.Path))
	if err := rememberRefusedPINs(cfg, false); err != nil {
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
		switch {
		case k.PKCS11 != nil:
			d.checkPKCS11(ctx, name, i, path, *k.PKCS11)
		case k.TPM != nil:
			d.checkTPM(ctx, name, i, path, *k.TPM, served)
		}
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

// permitsRW reports whether path's permission bits give this process read and write
// access without any capability: by owner, group (effective or supplementary) or
// others. group names the file's group, for advice.
func permitsRW(path string) (ok bool, group string) {
	fi, err := os.Stat(path)
	if err != nil {
		return true, "" // CheckDevice already opened it; nothing to say
	}
	st, isUnix := fi.Sys().(*syscall.Stat_t)
	if !isUnix {
		return true, ""
	}
	group = strconv.Itoa(int(st.Gid))
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	perm := fi.Mode().Perm()
	var bits fs.FileMode
	switch {
	case int(st.Uid) == os.Geteuid():
		bits = perm >> 6
	case inGroup(int(st.Gid)):
		bits = perm >> 3
	default:
		bits = perm
	}
	return bits&0o6 == 0o6, group
}

func inGroup(gid int) bool {
	if gid == os.Getegid() {
		return true
	}
	groups, _ := os.Getgroups()
	return slices.Contains(groups, gid)
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

func (d *doctor) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d.timeout)
}

func (d *doctor) checkPKCS11(ctx context.Context, name string, i int, cfgPath string, c hsm.Config) {
	field := fmt.Sprintf("keys[%d].pkcs11", i)
	if _, err := os.Stat(c.Module); err != nil {
		d.fail(name+" module loads", err.Error(), "install the token vendor's PKCS#11 library or correct "+field+".module")
		return
	}
	cctx, cancel := d.ctx(ctx)
	keys, err := hsm.ListKeys(cctx, c)
	cancel()
	var pinErr *hsm.PINError
	switch {
	case errors.Is(err, hsm.ErrPINSource):
		d.fail(name+" PIN works", err.Error(), "make "+field+".pinFile readable by the hwkms user (mode 0600), or set "+field+".pinEnv")
		return
	case errors.Is(err, hsm.ErrModule):
		d.fail(name+" module loads", err.Error(), "check that "+c.Module+" is a PKCS#11 module for this architecture and that its own config (e.g. SOFTHSM2_CONF) is readable")
		return
	}
	d.ok(name+" module loads", c.Module)
	switch {
	case errors.Is(err, hsm.ErrTokenNotFound):
		d.fail(name+" token found", err.Error(), "check "+field+".tokenLabel/tokenSerial/slot against the token list of your HSM tool")
		return
	case err != nil && !errors.As(err, &pinErr):
		d.fail(name+" token found", err.Error(), "check the token and the module's logs")
		return
	}
	d.ok(name+" token found", tokenDesc(c))
	if pinErr != nil {
		d.pinRefused = true
		d.fail(name+" PIN works", fmt.Sprintf("token %q refused the user PIN (%s)", pinErr.Token, hsm.Reason(pinErr)),
			"correct the PIN in "+field+".pinFile/pinEnv; do not retry blindly, repeated wrong PINs lock the token")
		return
	}
	d.ok(name+" PIN works", "logged in as CKU_USER")

	var match []hsm.KeyInfo
	for _, k := range keys {
		if k.Label == c.KeyLabel && (c.KeyCKAID == "" || strings.EqualFold(k.CKAID, c.KeyCKAID)) {
			match = append(match, k)
		}
	}
	switch {
	case len(match) == 0:
		d.fail(name+" key present", fmt.Sprintf("no AES key labelled %q on the token", c.KeyLabel), fmt.Sprintf("hwkms key create --config %s --key %d", cfgPath, i))
		return
	case len(match) > 1:
		d.fail(name+" key present", fmt.Sprintf("%d AES keys are labelled %q", len(match), c.KeyLabel), "set "+field+".keyCKAID to the CKA_ID of the one to use (hwkms key list)")
		return
	}
	ki := match[0]
	switch {
	case ki.Safe():
		d.ok(name+" key present", "key_id "+ki.KeyID+"; sensitive, never extractable")
	case c.AllowExtractable:
		d.warn(name+" key present", "key_id "+ki.KeyID+" has unsafe attributes ("+unsafeDesc(ki)+"), accepted because allowExtractable is set",
			"create a new key with hwkms key create, rotate to it and remove allowExtractable")
	default:
		d.fail(name+" key present", "key_id "+ki.KeyID+" has unsafe attributes: "+unsafeDesc(ki)+"; its value may exist outside the token",
			"create a new key with hwkms key create and rotate to it (docs/rotation.md)")
		return
	}

	cctx, cancel = d.ctx(ctx)
	defer cancel()
	kek, err := hsm.Open(cctx, c)
	if err != nil {
		d.fail(name+" round trip", err.Error(), "")
		return
	}
	defer kek.Close()
	d.roundTrip(cctx, name, kek)
}

func tokenDesc(c hsm.Config) string {
	switch {
	case c.TokenLabel != "":
		return fmt.Sprintf("label %q", c.TokenLabel)
	case c.TokenSerial != "":
		return fmt.Sprintf("serial %q", c.TokenSerial)
	case c.Slot != nil:
		return fmt.Sprintf("slot %d", *c.Slot)
	}
	return ""
}

func unsafeDesc(k hsm.KeyInfo) string {
	var s []string
	if k.Extractable {
		s = append(s, "CKA_EXTRACTABLE=true")
	}
	if !k.Sensitive {
		s = append(s, "CKA_SENSITIVE=false")
	}
	if !k.NeverExtractable {
		s = append(s, "CKA_NEVER_EXTRACTABLE=false")
	}
	if k.CKAID == "" {
		s = append(s, "no CKA_ID")
	}
	return strings.Join(s, ", ")
}

func (d *doctor) roundTrip(ctx context.Context, name string, k kek.KEK) {
	start := time.Now()
	h := plugin.Probe(ctx, k)
	if !h.OK {
		d.fail(name+" round trip", h.Reason+": "+h.Err.Error(), "")
		return
	}
	d.ok(name+" round trip", fmt.Sprintf("wrap+unwrap of 32 bytes in %s", time.Since(start).Round(10*time.Microsecond)))
}

func (d *doctor) checkTPM(ctx context.Context, name string, i int, cfgPath string, c tpm.Config, socketServed bool) {
	field := fmt.Sprintf("keys[%d].tpm", i)
	dev := c.Device
	if dev == "" {
		dev = tpm.DefaultDevice
	}
	cctx, cancel := d.ctx(ctx)
	err := tpm.CheckDevice(cctx, c)
	cancel()
	if err != nil {
		d.fail(name+" TPM reachable", err.Error(), "check "+field+".device; for /dev/tpmrm0 the hwkms user needs the tss group (and DeviceAllow= under systemd); for swtpm, that it runs")
		return
	}
	d.ok(name+" TPM reachable", dev)
	if strings.HasPrefix(dev, "/dev/") && os.Geteuid() == 0 {
		if ok, group := permitsRW(dev); !ok {
			d.warn(name+" TPM permissions", dev+" is reachable here only because root bypasses file permissions (CAP_DAC_OVERRIDE); the shipped systemd unit drops every capability, so serve would get \"permission denied\"",
				"keep SupplementaryGroups="+group+" in the unit (or run hwkms as a user in group "+group+")")
		}
	}
	if len(c.PCRs) > 0 {
		cctx, cancel := d.ctx(ctx)
		err := tpm.CheckPCRs(cctx, c)
		cancel()
		if err != nil {
			d.fail(name+" PCRs readable", err.Error(), "enable the SHA-256 PCR bank in firmware or remove "+field+".pcrs")
			return
		}
		d.ok(name+" PCRs readable", fmt.Sprintf("SHA-256 PCRs %v", c.PCRs))
	}
	cctx, cancel = d.ctx(ctx)
	info, err := tpm.Probe(cctx, c)
	cancel()
	switch {
	case errors.Is(err, kek.ErrKeyNotFound):
		d.fail(name+" key present", err.Error(), fmt.Sprintf("hwkms key create --config %s --key %d", cfgPath, i))
		return
	case errors.Is(err, tpm.ErrNotKEK):
		d.fail(name+" key present", err.Error(), "point "+field+" at a KEK made by hwkms key create (fixedTPM|fixedParent storage key)")
		return
	case err != nil:
		d.fail(name+" key present", err.Error(), "")
		return
	}
	d.ok(name+" key present", "key_id "+info.KeyID+"; fixedTPM|fixedParent, cannot leave this TPM")
	if socketServed && !strings.HasPrefix(filepath.Base(dev), "tpmrm") {
		d.warn(name+" round trip", "skipped: "+dev+" has no resource manager and another process serves the socket; opening the key would flush that process's TPM handles", "stop the running hwkms first")
		return
	}
	cctx, cancel = d.ctx(ctx)
	defer cancel()
	kek, err := tpm.Open(cctx, c)
	if err != nil {
		d.fail(name+" round trip", err.Error(), "check "+field+".authFile (wrong auth gives TPM_RC_BAD_AUTH) and, with pcrs, whether the PCRs changed since the data was sealed")
		return
	}
	defer kek.Close()
	d.roundTrip(cctx, name, kek)
}
