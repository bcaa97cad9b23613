package config

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os/user"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm"
)

// maxConfigSize bounds the config file read.
const maxConfigSize = 1 << 20

// Config is the hwkms configuration file. Field names are the YAML keys.
type Config struct {
	// Socket is where kube-apiserver connects.
	Socket Socket `json:"socket"`
	// Timeout is the gRPC connection timeout; match the provider timeout of the
	// EncryptionConfiguration (default 3s).
	Timeout Duration `json:"timeout,omitempty"`
	// ShutdownTimeout bounds graceful shutdown (default 5s).
	ShutdownTimeout Duration `json:"shutdownTimeout,omitempty"`
	// Health configures the cached health probe that answers Status.
	Health Health `json:"health,omitempty"`
	// Log configures structured logging.
	Log Log `json:"log,omitempty"`
	// Metrics configures the HTTP listener for /metrics, /healthz and /livez; off
	// unless Metrics.Address is set.
	Metrics Metrics `json:"metrics,omitempty"`
	// StateDir is the directory where hwkms keeps what must survive a restart: the
	// history of primary key_ids (HistoryPath) and the refused-PIN record. Default: the
	// directory of Socket.Path.
	StateDir string `json:"stateDir,omitempty"`
	// Keys lists the KEKs: the first encrypts, the others only decrypt.
	Keys []Key `json:"keys"`
}

// Socket configures the unix socket.
type Socket struct {
	// Path is the socket file; kube-apiserver's endpoint is "unix://" + Path.
	Path string `json:"path"`
	// Mode is the socket's permission bits as an octal string (default "0600").
	Mode string `json:"mode,omitempty"`
	// Group, if set, is the socket's group, by name or numeric gid.
	Group string `json:"group,omitempty"`
}

// Health configures the background probe.
type Health struct {
	// Interval between probes (default 10s).
	Interval Duration `json:"interval,omitempty"`
	// Timeout of one probe (default 3s).
	Timeout Duration `json:"timeout,omitempty"`
}

// Log configures logging.
type Log struct {
	// Level is debug, info, warn or error (default info). Debug logs one line per request.
	Level string `json:"level,omitempty"`
	// Format is text or json (default text).
	Format string `json:"format,omitempty"`
}

// Metrics configures the HTTP listener that serves Prometheus metrics (/metrics), the
// cached device health (/healthz) and liveness (/livez).
type Metrics struct {
	// Address is host:port to listen on, e.g. "127.0.0.1:9464". Empty (the default)
	// means no listener. The host must be a loopback address ("127.0.0.1", "::1",
	// "localhost") unless AllowNonLoopback is set: the endpoints are unauthenticated.
	Address string `json:"address,omitempty"`
	// AllowNonLoopback accepts an Address that is not loopback (including ":9464",
	// every interface). Protect it by other means (firewall, network policy).
	AllowNonLoopback bool `json:"allowNonLoopback,omitempty"`
}

// Key is one KEK: exactly one backend block is set.
type Key struct {
	// PKCS11 selects a key in a PKCS#11 token.
	PKCS11 *hsm.Config `json:"pkcs11,omitempty"`
	// TPM selects a KEK in a TPM 2.0.
	TPM *tpm.Config `json:"tpm,omitempty"`
}

// Duration is a time.Duration written as a Go duration string ("3s", "250ms"). A
// string that does not parse is kept as invalid and reported by Validate, so the
// message can name the field.
type Duration struct {
	d   time.Duration
	bad string
}

// Dur returns a Duration of d.
func Dur(d time.Duration) Duration { return Duration{d: d} }

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return d.d }

// UnmarshalJSON parses a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		// Not a string (a bare number such as 3): Validate reports it with the field's
		// name, which this method does not know.
		*d = Duration{bad: string(b)}
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		*d = Duration{bad: s}
		return nil
	}
	*d = Duration{d: v}
	return nil
}

// MarshalJSON writes the duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.d.String()) }

// check validates a duration field.
func (d Duration) check(field string, min time.Duration) error {
	switch {
	case d.bad != "":
		return fmt.Errorf("%s: invalid duration %q (use a value like \"3s\")", field, d.bad)
	case d.d < min:
		return fmt.Errorf("%s: must be at least %s, got %s", field, min, d.d)
	}
	return nil
}

// Load reads, strictly parses and validates a config file.
func Load(path string) (*Config, error) {
	data, err := readConfig(path)
	if err != nil {
		return nil, err
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// readConfig reads a config file of at most maxConfigSize bytes (files.ReadSecret:
// regular file, size cap). The config names secrets but holds none, so other users may
// read it.
func readConfig(path string) ([]byte, error) {
	data, err := files.ReadSecret(path, files.SecretOptions{MaxBytes: maxConfigSize, AllowOtherAccess: true})
	switch {
	case errors.Is(err, files.ErrTooLarge):
		return nil, fmt.Errorf("config %s is larger than %d bytes", path, maxConfigSize)
	case err != nil:
		return nil, fmt.Errorf("read config: %w", err)
	}
	return data, nil
}

// Parse strictly parses and validates YAML config bytes. Unknown and duplicate fields
// are errors.
func Parse(data []byte) (*Config, error) {
	var c Config
	// Checked first: strict decoding does not say where an unknown field is, and
	// matches names case-insensitively ("pinfile" would quietly set pinFile).
	if path := unknownField(data); path != "" {
		return nil, fmt.Errorf("parse: %s: unknown field (names are case-sensitive; see deploy/hwkms.yaml for the fields)", path)
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// unknownField returns the path (such as "keys[0].pkcs11.pinfile") of the first
// field in data that Config does not have, or "" if there is none or data does not
// parse as YAML: strict decoding names an unknown field without saying where it is.
func unknownField(data []byte) string {
	var v any
	if err := yaml.Unmarshal(data, &v); err != nil {
		return ""
	}
	return unknownIn(v, reflect.TypeFor[Config](), "")
}

func unknownIn(v any, t reflect.Type, path string) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		fields := map[string]reflect.Type{}
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name != "" && name != "-" {
				fields[name] = f.Type
			}
		}
		names := make([]string, 0, len(m))
		for k := range m {
			names = append(names, k)
		}
		slices.Sort(names)
		for _, k := range names {
			sub := path + "." + k
			if path == "" {
				sub = k
			}
			ft, ok := fields[k]
			if !ok {
				return sub
			}
			if p := unknownIn(m[k], ft, sub); p != "" {
				return p
			}
		}
	case reflect.Slice:
		items, ok := v.([]any)
		if !ok {
			return ""
		}
		for i, item := range items {
			if p := unknownIn(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); p != "" {
				return p
			}
		}
	}
	return ""
}

func (c *Config) applyDefaults() {
	if c.Socket.Mode == "" {
		c.Socket.Mode = "0600"
	}
	if c.StateDir == "" && c.Socket.Path != "" {
		c.StateDir = filepath.Dir(c.Socket.Path)
	}
	for _, f := range []struct {
		d   *Duration
		def time.Duration
	}{
		{&c.Timeout, 3 * time.Second},
		{&c.ShutdownTimeout, 5 * time.Second},
		{&c.Health.Interval, plugin.DefaultHealthInterval},
		{&c.Health.Timeout, plugin.DefaultProbeTimeout},
	} {
		if *f.d == (Duration{}) {
			*f.d = Dur(f.def)
		}
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
}

// Validate checks every field; the error lists every problem, each naming its field.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	switch {
	case c.Socket.Path == "":
		bad("socket.path", "is required")
	case !filepath.IsAbs(c.Socket.Path):
		bad("socket.path", "must be an absolute path, got %q", c.Socket.Path)
	case len(c.Socket.Path) > 107:
		bad("socket.path", "is %d bytes; unix socket paths are limited to 107", len(c.Socket.Path))
	}
	if c.StateDir != "" && !filepath.IsAbs(c.StateDir) {
		bad("stateDir", "must be an absolute path, got %q", c.StateDir)
	}
	if _, err := c.SocketMode(); err != nil {
		bad("socket.mode", "%v", err)
	}
	if _, err := c.SocketGID(); err != nil {
		bad("socket.group", "%v", err)
	}
	for _, err := range []error{
		c.Timeout.check("timeout", time.Millisecond),
		c.ShutdownTimeout.check("shutdownTimeout", 0),
		c.Health.Interval.check("health.interval", time.Second),
		c.Health.Timeout.check("health.timeout", time.Millisecond),
	} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		bad("log.level", "%v", err)
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		bad("log.format", "must be text or json, got %q", c.Log.Format)
	}
	if err := c.Metrics.check(); err != nil {
		bad("metrics.address", "%v", err)
	}
	if len(c.Keys) == 0 {
		bad("keys", "at least one key is required (the first one encrypts)")
	}
	for i, k := range c.Keys {
		errs = append(errs, validateKey(k, fmt.Sprintf("keys[%d]", i))...)
	}
	return errors.Join(errs...)
}

// SocketMode parses Socket.Mode.
func (c *Config) SocketMode() (fs.FileMode, error) {
	v, err := strconv.ParseUint(c.Socket.Mode, 8, 32)
	if err != nil || v&^0o777 != 0 {
		return 0, fmt.Errorf("must be octal permission bits like \"0660\", got %q", c.Socket.Mode)
	}
	if v&0o007 != 0 {
		return 0, fmt.Errorf("%q gives access to every local user; use group access instead", c.Socket.Mode)
	}
	if v&0o600 != 0o600 {
		return 0, fmt.Errorf("%q must give the owner read and write", c.Socket.Mode)
	}
	return fs.FileMode(v), nil
}

// SocketGID resolves Socket.Group; -1 means unset.
func (c *Config) SocketGID() (int, error) {
	g := c.Socket.Group
	if g == "" {
		return -1, nil
	}
	if id, err := strconv.Atoi(g); err == nil && id >= 0 {
		return id, nil
	}
	grp, err := user.LookupGroup(g)
	if err != nil {
		return -1, fmt.Errorf("unknown group %q", g)
	}
	return strconv.Atoi(grp.Gid)
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("must be debug, info, warn or error, got %q", s)
	}
	return l, nil
}

// Logger returns a slog.Logger writing to w as the config says.
func (c *Config) Logger(w interface{ Write([]byte) (int, error) }) *slog.Logger {
	lvl, _ := parseLevel(c.Log.Level)
	opts := &slog.HandlerOptions{Level: lvl}
	if strings.EqualFold(c.Log.Format, "json") {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// OpenKey opens one configured key on its backend.
func OpenKey(ctx context.Context, k Key) (kek.KEK, error) {
	b := k.resolved()
	if b == nil {
		return nil, errNoBackend
	}
	return b.Open(ctx)
}

// OpenKeyring opens every key of cfg and builds the keyring (first key primary). On
// error, keys already opened are closed again. Errors name the key by index.
func OpenKeyring(ctx context.Context, cfg *Config) (*plugin.Keyring, error) {
	keks := make([]kek.KEK, 0, len(cfg.Keys))
	fail := func(err error) (*plugin.Keyring, error) {
		for _, k := range keks {
			k.Close()
		}
		return nil, err
	}
	seen := make(map[string]int, len(cfg.Keys))
	for i, k := range cfg.Keys {
		kek, err := OpenKey(ctx, k)
		if err != nil {
			return fail(fmt.Errorf("keys[%d] (%s): %w", i, k.Backend(), err))
		}
		keks = append(keks, kek)
		if j, dup := seen[kek.ID()]; dup {
			return fail(fmt.Errorf("keys[%d]: same key as keys[%d] (key_id %s); each key may be listed once", i, j, kek.ID()))
		}
		seen[kek.ID()] = i
	}
	ring, err := plugin.NewKeyring(keks[0], keks[1:]...)
	if err != nil {
		return fail(err)
	}
	return ring, nil
}

// OpenTimeout bounds opening the keys at start and at every reload (module load,
// login, finding each key, on every device): a network HSM that stopped answering must
// not hang a reload, and every later one queued behind it, forever.
const OpenTimeout = 60 * time.Second

// openKeyring is OpenKeyring; tests replace it with one that hangs.
var openKeyring = OpenKeyring

// OpenKeyringWithin is OpenKeyring bounded by d. A device call cannot be interrupted,
// so when d passes (or ctx ends) first, the open goes on in the background and the
// keyring it may still produce is closed; the error wraps kek.ErrUnavailable and
// context.DeadlineExceeded (or ctx's error).
func OpenKeyringWithin(ctx context.Context, cfg *Config, d time.Duration) (*plugin.Keyring, error) {
	type result struct {
		ring *plugin.Keyring
		err  error
	}
	done := make(chan result, 1)
	go func() {
		ring, err := openKeyring(ctx, cfg)
		done <- result{ring, err}
	}()
	timer := time.NewTimer(d)
	defer timer.Stop()
	var why error
	select {
	case r := <-done:
		return r.ring, r.err
	case <-timer.C:
		why = context.DeadlineExceeded
	case <-ctx.Done():
		why = ctx.Err()
	}
	go func() {
		if r := <-done; r.ring != nil {
			r.ring.Close()
		}
	}()
	return nil, fmt.Errorf("opening the keys did not finish within %v (a device does not answer; the open goes on in the background): %w: %w", d, kek.ErrUnavailable, why)
}

// check validates Metrics.Address.
func (m Metrics) check() error {
	if m.Address == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(m.Address)
	if err != nil {
		return fmt.Errorf("want host:port such as \"127.0.0.1:9464\", got %q", m.Address)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("port of %q must be a number 0-65535", m.Address)
	}
	if m.AllowNonLoopback || isLoopback(host) {
		return nil
	}
	if host == "" {
		return fmt.Errorf("%q listens on every interface; use a loopback address such as \"127.0.0.1%s\", or set metrics.allowNonLoopback", m.Address, m.Address)
	}
	return fmt.Errorf("%q is not a loopback address; the endpoints are unauthenticated, so use 127.0.0.1 or ::1, or set metrics.allowNonLoopback", host)
}

// isLoopback reports whether host is "localhost" or a loopback IP literal.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
